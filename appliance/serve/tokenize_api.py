"""/tokenize and /detokenize (vLLM's extensions): the served model's own token ids for a prompt or a chat,
and the text of token ids, from the router's tokenizer (no engine involved).

    POST /tokenize   {"prompt": "Hello"}                       -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /tokenize   {"messages": [...], "add_generation_prompt": true}
    POST /detokenize {"tokens": [9906, 28]}                    -> {"prompt": "Hello,"}

A prompt gets the BOS the checkpoint asks for unless ``add_special_tokens`` is false, as /v1/completions
encodes it; messages go through the chat template as /v1/chat/completions renders them.
"""

from __future__ import annotations

from typing import Any

import msgspec

from appliance.serve import openai_api as oai
from appliance.serve import openai_schema as schema

TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                             "return_token_strs"})
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})


def _known(body: dict[str, Any], fields: frozenset[str], path: str) -> None:
    bad = next((k for k in body if k not in fields), None)
    if bad is not None:
        raise oai.ApiError(400, f"unrecognized request field {bad!r} for {path}", bad)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise oai.ApiError(400, f"{name} must be a boolean", name)
    return value


def tokenize(body: dict[str, Any], tokenizer: Any, served: str, max_model_len: int,
             aliases: tuple[str, ...] = ()) -> dict[str, Any]:
    oai.check_model(body, served, aliases)
    _known(body, TOKENIZE_FIELDS, "/tokenize")
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise oai.ApiError(400, "send one of prompt (a string) or messages (a chat)", "prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise oai.ApiError(400, "prompt must be a string", "prompt")
        ids = (tokenizer.encode_prompt(prompt) if _flag(body, "add_special_tokens", True)
               else tokenizer.encode(prompt))
    else:
        try:
            typed = msgspec.convert(messages, list[schema.Message], strict=True)
        except msgspec.ValidationError as exc:
            raise oai.ApiError(400, f"messages: {exc}", "messages") from None
        if not typed:
            raise oai.ApiError(400, "messages must not be empty", "messages")
        clean = [oai.message_dict(msgspec.to_builtins(m)) for m in typed]
        try:
            text = tokenizer.render_chat(clean, _flag(body, "add_generation_prompt", True))
        except ValueError as exc:
            raise oai.ApiError(400, str(exc), "messages") from None
        ids = tokenizer.encode(text)
    strs = ([tokenizer.id_to_token(t) for t in ids] if _flag(body, "return_token_strs", False) else None)
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(body: dict[str, Any], tokenizer: Any, served: str, vocab_size: int,
               aliases: tuple[str, ...] = ()) -> dict[str, Any]:
    oai.check_model(body, served, aliases)
    _known(body, DETOKENIZE_FIELDS, "/detokenize")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise oai.ApiError(400, "tokens must be a list of token ids", "tokens")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise oai.ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(tokens)}

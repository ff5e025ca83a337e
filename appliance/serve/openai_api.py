"""OpenAI-compatible request parsing and validation, and the response objects.

The bodies' types and limits are msgspec Structs (`openai_schema`); this module adds what they cannot
state (the model name, the context, the vocabulary, best_of >= n). Every bad input becomes an
:class:`ApiError` with a 4xx status and a message naming the field, in OpenAI's error shape. Accepts
what the ``openai`` client and ``vllm bench serve`` send; a field pdbox would not honour is refused,
never dropped (`openai_fields`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from appliance.model.generation import GenerationDefaults
from appliance.serve import openai_fields as fields
from appliance.serve import openai_schema as schema
from appliance.serve.openai_schema import MAX_N, MAX_PROMPTS
from appliance.serve.protocol import ConstraintSpec, Sampling
from appliance.serve.response_format import FormatError, parse_constraint
from appliance.serve.tools import ToolError, Tools, history_message, parse_tools, with_tools

NO_DEFAULTS = GenerationDefaults()  # a checkpoint that states no sampling defaults


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"invalid number {name} in JSON body: NaN and Infinity are not allowed")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


@dataclass(frozen=True)
class ParsedRequest:
    endpoint: str  # "chat" | "completions"
    model: str
    prompt_ids: list[int]
    sampling: Sampling
    stream: bool
    include_usage: bool
    want_logprobs: bool
    tools: Tools | None = None
    keep: int | None = None  # best_of: return this many of the ``sampling.n`` samples, the likeliest
    echo: str | None = None  # /v1/completions echo: the prompt's text, which each choice's text starts with

    @property
    def n(self) -> int:
        """Samples drawn (``best_of`` when it exceeds ``n``)."""
        return self.sampling.n


def check_model(body: dict, served: str, aliases: tuple[str, ...] = ()) -> str:
    model = body.get("model", served)
    if model is None:
        model = served
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    if model not in (served, *aliases):
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served!r}", "model",
                       "not_found_error")
    return model


def _refuse(found: tuple[str, str] | None) -> None:
    if found is not None:
        raise ApiError(400, found[1], found[0])


def _in_vocab(ids: Any, vocab_size: int, what: str, field: str) -> None:
    """Token ids past the vocabulary (or negative), named before the Struct's type checks."""
    if isinstance(ids, list):
        bad = next((t for t in ids if type(t) is int and not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"{what} {bad} is outside the vocabulary [0, {vocab_size})", field)


def _decoded(body: dict[str, Any], endpoint: str, vocab_size: int) -> tuple[Any, ConstraintSpec | None]:
    """The body as its Struct (`openai_schema`) and its constraint; every refusal a 400 naming the field."""
    _refuse(fields.refusal(body, endpoint))
    bad = next((k for k, v in body.items() if isinstance(v, float) and not math.isfinite(v)), None)
    if bad is not None:  # e.g. 1e400, which JSON reads as infinity
        raise ApiError(400, f"{bad} must be finite", bad)
    _in_vocab(body.get("stop_token_ids"), vocab_size, "stop_token_ids entry", "stop_token_ids")
    try:
        constraint = parse_constraint(body)  # response_format and the guided_* fields, in their own words
    except FormatError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    try:
        return schema.decode({k: v for k, v in body.items() if k in fields.APPLIED[endpoint]}, endpoint), constraint
    except schema.BodyError as exc:
        raise ApiError(400, str(exc), exc.field) from None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> list[tuple[int, float]]:
    """``{"token id": bias}`` as ``[(id, bias)]``; a key that is not a token id of the vocabulary is a 400."""
    out = []
    for key, value in (bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() else None
        if token is None or token >= vocab_size:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        out.append((token, float(value)))
    if len({t for t, _ in out}) < len(out):
        raise ApiError(400, "logit_bias names a token id twice", "logit_bias")
    return out


def _sampling(req: Any, constraint: ConstraintSpec | None, prompt_len: int, prompt_field: str, max_model_len: int,
              logprobs: int | None, defaults: GenerationDefaults, vocab_size: int,
              tools: Tools | None = None) -> Sampling:
    """The checks no Struct can state (the context, the constraint with tools), then the sampling."""
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    room = max_model_len - prompt_len
    if prompt_len >= max_model_len:
        raise ApiError(400, f"prompt is {prompt_len} tokens but the context holds {max_model_len} (prompt plus "
                            "at least one generated token)", prompt_field)
    max_tokens = getattr(req, key)
    if max_tokens is None:
        max_tokens = min(room, 1024)
    if max_tokens > room:
        raise ApiError(400, f"{key} is {max_tokens} but only {room} tokens fit after the {prompt_len}-token "
                            f"prompt in the {max_model_len}-token context", key)
    min_tokens = req.min_tokens or 0
    if min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens ({min_tokens}) must be at most {key} ({max_tokens})", "min_tokens")
    if tools is not None and tools.enforced:
        if constraint is not None:
            raise ApiError(400, f"tool_choice {tools.choice} constrains the answer to a tool call, which excludes "
                                "response_format (other than text) and the guided_* fields", "tool_choice")
        constraint = tools.constraint
    if min_tokens and constraint is not None:  # the grammar may end the answer where EOS is banned
        raise ApiError(400, "min_tokens cannot hold an answer the structured output or tool call constrains open",
                       "min_tokens")
    # what the request leaves unset: the checkpoint's, else pdbox's
    chosen = defaults.sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                               repetition_penalty=req.repetition_penalty)
    top_k = chosen["top_k"]
    return Sampling(
        n=req.n or 1,
        max_tokens=max_tokens,
        temperature=float(chosen["temperature"]),
        top_p=float(chosen["top_p"]),
        top_k=-1 if top_k in (None, 0) else top_k,  # 0: vLLM's spelling of "off"
        min_p=float(req.min_p or 0.0),
        seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or ()),
        stop_token_ids=list(req.stop_token_ids or ()),
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
        constraint=constraint,
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=float(chosen["repetition_penalty"]),
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        min_tokens=min_tokens,
    )


def _streaming(req: Any) -> tuple[bool, bool]:
    return bool(req.stream), bool(req.stream_options and req.stream_options.include_usage)


def parse_chat(body: dict, tokenizer: Any, served: str, max_model_len: int, aliases: tuple[str, ...] = (),
               defaults: GenerationDefaults = NO_DEFAULTS) -> ParsedRequest:
    model = check_model(body, served, aliases)
    template = getattr(tokenizer, "chat_template", "") or ""
    try:
        tools = parse_tools(body, template) if fields.refusal(body, "chat") is None else None
    except ToolError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    req, constraint = _decoded(body, "chat", tokenizer.vocab_size)
    try:
        clean = [history_message(message_dict(m), i, template) for i, m in enumerate(body["messages"])]
        msgs, variable = with_tools(clean, tools, template)
    except ToolError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    try:
        ids = tokenizer.encode_chat(msgs, tools=variable) if variable is not None else tokenizer.encode_chat(msgs)
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages") from None
    want = bool(req.logprobs)
    sampling = _sampling(req, constraint, len(ids), "messages", max_model_len, (req.top_logprobs or 0) if want
                         else None, defaults, tokenizer.vocab_size, tools)
    return ParsedRequest("chat", model, ids, sampling, *_streaming(req), want, tools)


def message_dict(m: dict[str, Any]) -> dict[str, Any]:
    """A message the Struct accepted: text content (parts joined), tool-call fields kept as sent."""
    content = m.get("content") or ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        content = "".join(part["text"] for part in content)
    out = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
    for key in ("tool_calls", "tool_call_id", "name"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def split_prompts(body: dict) -> list[dict]:
    """A /v1/completions body per prompt: ``prompt`` may list several (strings, or lists of token ids), each
    answered as if sent alone, its choices after the previous prompt's (OpenAI's batch form)."""
    prompt = body.get("prompt")
    if not (isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt)):
        return [body]  # one prompt (text, or token ids), or a shape the Struct names
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"prompt lists {len(prompt)} prompts; at most {MAX_PROMPTS} are allowed", "prompt")
    if not all(isinstance(p, type(prompt[0])) for p in prompt):
        raise ApiError(400, "prompt must list strings or lists of token ids, not both", "prompt")
    return [{**body, "prompt": p} for p in prompt]


def parse_completion(body: dict, tokenizer: Any, served: str, max_model_len: int, vocab_size: int,
                     aliases: tuple[str, ...] = (), defaults: GenerationDefaults = NO_DEFAULTS) -> ParsedRequest:
    """One prompt's request (:func:`split_prompts` makes a body per prompt of a batch)."""
    model = check_model(body, served, aliases)
    if isinstance(body.get("prompt"), list) and any(isinstance(p, str | list) for p in body["prompt"]):
        raise ApiError(400, "prompt must be a string, a list of token ids, or a list of either (split first)",
                       "prompt")
    _in_vocab(body.get("prompt"), vocab_size, "prompt token id", "prompt")
    req, constraint = _decoded(body, "completions", vocab_size)
    ids = tokenizer.encode_prompt(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    if not ids:
        raise ApiError(400, "prompt encodes to zero tokens", "prompt")
    lp = req.logprobs
    sampling = _sampling(req, constraint, len(ids), "prompt", max_model_len, lp, defaults, vocab_size)
    echo = None
    if req.echo:
        echo = req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
        if lp is not None:  # the engine scores the prompt as it prefills it
            sampling = msgspec.structs.replace(sampling, prompt_logprobs=lp)
    stream, include = _streaming(req)
    best_of = req.best_of
    if best_of is None or best_of == sampling.n:
        return ParsedRequest("completions", model, ids, sampling, stream, include, lp is not None, echo=echo)
    if best_of < sampling.n:
        raise ApiError(400, f"best_of must be between n ({sampling.n}) and {MAX_N}, got {best_of}", "best_of")
    if stream:
        raise ApiError(400, "best_of > n cannot stream: the best samples are known only when all have ended",
                       "best_of")
    # best_of samples (each with its chosen token's logprob), the n with the highest sum returned
    ranked = msgspec.structs.replace(sampling, n=best_of, logprobs=lp or 0)
    return ParsedRequest("completions", model, ids, ranked, stream, include, lp is not None, keep=sampling.n,
                         echo=echo)


# -- responses ---------------------------------------------------------------------------------------
def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chunk(req: ParsedRequest, rid: str, created: int, text: str | None, finish: str | None,
          first: bool = False, logprobs: Any = None, index: int = 0,
          tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if req.endpoint == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: ParsedRequest, rid: str, created: int, use: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if req.endpoint == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [], "usage": use}


def choice_body(req: ParsedRequest, index: int, text: str | None, finish: str | None, logprobs: Any = None,
                tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One choice of a whole (non-streamed) answer; ``tool_calls`` (chat) go in the message."""
    if req.endpoint == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}


def full_response(req: ParsedRequest, rid: str, choices: list[dict[str, Any]], use: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion" if req.endpoint == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model, "choices": choices,
            "usage": use}


def format_logprobs(req: ParsedRequest, tokenizer: Any, entries: list[dict]) -> Any:
    """OpenAI logprobs objects for the tokens of one chunk (or a whole answer)."""
    if not req.want_logprobs or not entries:
        return None
    if req.endpoint == "chat":
        def entry(token_id: int, logprob: float) -> dict[str, Any]:  # bytes: the text's UTF-8, as vLLM gives it
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

        return {"content": [{**entry(e["token_id"], e["logprob"]), "top_logprobs": [entry(t, v) for t, v in e["top"]]}
                            for e in entries]}
    toks = [tokenizer.decode([e["token_id"]], skip_special_tokens=False) for e in entries]
    return {"tokens": toks, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else
                             {tokenizer.decode([t], skip_special_tokens=False): v for t, v in e["top"]}
                             for e in entries]}


def echoed_prompt(prompt_ids: list[int], scores: list[dict]) -> list[dict]:
    """Logprob entries for an echoed prompt: its first token has none (nothing comes before it)."""
    return [{"token_id": prompt_ids[0], "logprob": None, "top": None}, *scores]

"""OpenAI-compatible request parsing and validation, and the response objects.

Every bad input becomes an :class:`ApiError` with a 4xx status and a message naming the field, in
OpenAI's error shape. Accepts what the ``openai`` client and ``vllm bench serve`` send; a field pdbox
would not honour is refused, never dropped (`openai_fields`).
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
from appliance.serve.protocol import Sampling
from appliance.serve.response_format import FormatError, parse_constraint
from appliance.serve.tools import ToolError, Tools, history_message, parse_tools, with_tools

MAX_STOP = 16
MAX_STOP_CHARS = 1024   # one stop string; the stream holds back up to this many characters per token
MAX_LOGPROBS = 20
MAX_N = 8  # choices per request; sample i runs with seed + i (mod 2^63) when a seed is given
ROLES = ("system", "user", "assistant", "tool", "developer")
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

    @property
    def n(self) -> int:
        """Samples drawn (``best_of`` when it exceeds ``n``)."""
        return self.sampling.n


def _num(body: dict, key: str, default: float, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError(400, f"{key} must be a number, got {type(v).__name__}", key)
    if not math.isfinite(v):
        raise ApiError(400, f"{key} must be finite", key)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(400, f"{key} must be {'>' if lo_open else '>='} {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise ApiError(400, f"{key} must be <= {hi}, got {v}", key)
    return float(v)


def _int(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{key} must be an integer, got {type(v).__name__}", key)
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{key} must be a boolean, got {type(v).__name__}", key)
    return v


def _common(body: dict, prompt_len: int, max_model_len: int, vocab_size: int, logprobs: int | None,
            defaults: GenerationDefaults, tools: Tools | None = None) -> Sampling:
    fallback = defaults.sampling()  # what the request leaves unset: the checkpoint's, else pdbox's
    n = _int(body, "n", 1)
    assert n is not None
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}, got {n}", "n")
    mt = body.get("max_completion_tokens")
    key = "max_completion_tokens" if mt is not None else "max_tokens"
    room = max_model_len - prompt_len
    if prompt_len >= max_model_len:
        raise ApiError(400, f"prompt is {prompt_len} tokens but the context holds {max_model_len} (prompt plus "
                            "at least one generated token)", "messages" if "messages" in body else "prompt")
    max_tokens = _int(body, key, None)
    if max_tokens is None:
        max_tokens = min(room, 1024)
    if max_tokens < 1:
        raise ApiError(400, f"{key} must be >= 1, got {max_tokens}", key)
    if max_tokens > room:
        raise ApiError(400, f"{key} is {max_tokens} but only {room} tokens fit after the {prompt_len}-token "
                            f"prompt in the {max_model_len}-token context", key)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop has {len(stops)} entries; at most {MAX_STOP} are allowed", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"each stop string must be at most {MAX_STOP_CHARS} characters", "stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is None:
        stop_ids = []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise ApiError(400, "stop_token_ids must be a list of integers", "stop_token_ids")
    if len(stop_ids) > MAX_STOP:
        raise ApiError(400, f"stop_token_ids has {len(stop_ids)} entries; at most {MAX_STOP}", "stop_token_ids")
    bad = next((t for t in stop_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"stop_token_ids entry {bad} is outside the vocabulary [0, {vocab_size})", "stop_token_ids")
    top_k = _int(body, "top_k", fallback["top_k"])
    if top_k is not None and top_k < -1:
        raise ApiError(400, f"top_k must be -1 or 0 (off) or >= 1, got {top_k}", "top_k")
    if top_k == 0:  # vLLM's spelling of "off"
        top_k = -1
    for key in fields.PENALTIES:
        _num(body, key, 0.0, lo=-2.0, hi=2.0)
    _refuse(fields.penalty_refusal(body))
    seed = _int(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"seed must be in [0, 2^63), got {seed}", "seed")
    try:
        constraint = parse_constraint(body)
    except FormatError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    if tools is not None and tools.enforced:
        if constraint is not None:
            raise ApiError(400, f"tool_choice {tools.choice} constrains the answer to a tool call, which excludes "
                                "response_format (other than text) and guided_regex", "tool_choice")
        constraint = tools.constraint
    return Sampling(
        n=n,
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", fallback["temperature"], lo=0.0, hi=100.0),
        top_p=_num(body, "top_p", fallback["top_p"], lo=0.0, hi=1.0, lo_open=True),
        top_k=top_k if top_k is not None else -1,
        min_p=_num(body, "min_p", 0.0, lo=0.0, hi=1.0),
        seed=seed,
        stop=stops,
        stop_token_ids=list(stop_ids),
        ignore_eos=_bool(body, "ignore_eos", False),
        logprobs=logprobs,
        constraint=constraint,
    )


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include = bool(opts and _bool(opts, "include_usage", False))
    return stream, include


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


def parse_chat(body: dict, tokenizer: Any, served: str, max_model_len: int, aliases: tuple[str, ...] = (),
               defaults: GenerationDefaults = NO_DEFAULTS) -> ParsedRequest:
    model = check_model(body, served, aliases)
    _refuse(fields.refusal(body, "chat"))
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "messages is required", "messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages must be a list of {role, content} objects", "messages")
    if not messages:
        raise ApiError(400, "messages must not be empty", "messages")
    template = getattr(tokenizer, "chat_template", "") or ""
    try:
        tools = parse_tools(body, template)
        clean = [history_message(_message(i, m), i, template) for i, m in enumerate(messages)]
        msgs, variable = with_tools(clean, tools, template)
    except ToolError as exc:
        raise ApiError(400, str(exc), exc.field) from None
    try:
        ids = tokenizer.encode_chat(msgs, tools=variable) if variable is not None else tokenizer.encode_chat(msgs)
    except ValueError as exc:
        raise ApiError(400, str(exc), "messages") from None
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise ApiError(400, "logprobs must be a boolean for chat completions", "logprobs")
    top = _int(body, "top_logprobs", None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {top}", "top_logprobs")
    want = bool(lp)
    sampling = _common(body, len(ids), max_model_len, tokenizer.vocab_size, (top or 0) if want else None, defaults,
                       tools)
    stream, include = _stream_opts(body)
    return ParsedRequest("chat", model, ids, sampling, stream, include, want, tools)


def _message(i: int, m: Any) -> dict[str, Any]:
    """``messages[i]`` checked: a role, text content (parts joined); tool-call fields kept as sent."""
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role")
    content = m.get("content", "")
    if content is None:
        content = ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}] must be a text part", f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
    out = {"role": "system" if role == "developer" else role, "content": content}
    for key in ("tool_calls", "tool_call_id", "name"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def parse_completion(body: dict, tokenizer: Any, served: str, max_model_len: int, vocab_size: int,
                     aliases: tuple[str, ...] = (), defaults: GenerationDefaults = NO_DEFAULTS) -> ParsedRequest:
    model = check_model(body, served, aliases)
    _refuse(fields.refusal(body, "completions"))
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt must not be empty", "prompt")
        ids = tokenizer.encode_prompt(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
        ids = list(prompt)
    else:
        raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                       "prompt")
    if not ids:
        raise ApiError(400, "prompt encodes to zero tokens", "prompt")
    lp = _int(body, "logprobs", None)
    if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {lp}", "logprobs")
    sampling = _common(body, len(ids), max_model_len, vocab_size, lp, defaults)
    stream, include = _stream_opts(body)
    best_of = _int(body, "best_of", None)
    if best_of is None or best_of == sampling.n:
        return ParsedRequest("completions", model, ids, sampling, stream, include, lp is not None)
    if not sampling.n <= best_of <= MAX_N:
        raise ApiError(400, f"best_of must be between n ({sampling.n}) and {MAX_N}, got {best_of}", "best_of")
    if stream:
        raise ApiError(400, "best_of > n cannot stream: the best samples are known only when all have ended",
                       "best_of")
    # best_of samples (each with its chosen token's logprob), the n with the highest sum returned
    ranked = msgspec.structs.replace(sampling, n=best_of, logprobs=lp or 0)
    return ParsedRequest("completions", model, ids, ranked, stream, include, lp is not None, keep=sampling.n)


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
        content = []
        for e in entries:
            tok = tokenizer.decode([e["token_id"]], skip_special_tokens=False)
            top = [{"token": tokenizer.decode([t], skip_special_tokens=False), "logprob": v} for t, v in e["top"]]
            content.append({"token": tok, "logprob": e["logprob"], "top_logprobs": top})
        return {"content": content}
    toks = [tokenizer.decode([e["token_id"]], skip_special_tokens=False) for e in entries]
    return {"tokens": toks, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{tokenizer.decode([t], skip_special_tokens=False): v for t, v in e["top"]}
                             for e in entries]}

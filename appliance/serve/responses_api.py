"""/v1/responses, OpenAI's Responses API, for text: a body is read as the chat request it amounts to
(the same checks, sampling, placement and engines), and the answer comes back as a Response object or,
streamed, as its typed events (``response.created`` ... ``response.output_text.delta`` ...
``response.completed``).

Served: ``input`` (a string, or messages whose content is a string or ``input_text``/``output_text``
parts), ``instructions`` (a system message first), ``max_output_tokens``, ``temperature``, ``top_p``,
``text.format`` (text, json_object, json_schema: structured outputs), ``stream``, and the metadata
fields. pdbox keeps no responses, so ``previous_response_id``, ``conversation`` and ``store: true``
are refused, as are tools, reasoning and other input types: a 400 that names the field, never dropped.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from appliance.serve import openai_api as oai
from appliance.serve.choices import Choice, Piece
from appliance.serve.relay import Outcome
from appliance.serve.sse_formats import sse, totals

CHAT_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}
COPIED = ("model", "temperature", "top_p", "stream")
METADATA = frozenset({"metadata", "user", "safety_identifier", "prompt_cache_key", "service_tier"})
# field -> (is its value a no-op?, why pdbox refuses any other)
NOOP: dict[str, tuple[Any, str]] = {
    "store": (lambda v: v in (None, False), "pdbox keeps no responses: send store false or leave it out"),
    "previous_response_id": (lambda v: v is None, "pdbox keeps no responses to continue from; send the "
                                                  "conversation in input"),
    "conversation": (lambda v: v is None, "pdbox keeps no conversations; send the messages in input"),
    "background": (lambda v: v in (None, False), "background responses are not supported"),
    "tools": (lambda v: v in (None, []), "tools are served on /v1/chat/completions"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tools are served on /v1/chat/completions"),
    "parallel_tool_calls": (lambda v: True, ""),
    "max_tool_calls": (lambda v: v is None, "tools are served on /v1/chat/completions"),
    "reasoning": (lambda v: v is None, "reasoning is not supported by this model"),
    "include": (lambda v: v in (None, []), "include: pdbox adds nothing to a response"),
    "truncation": (lambda v: v in (None, "disabled"), "truncation: a prompt over the context is refused"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs is served on /v1/chat/completions"),
    "stream_options": (lambda v: v is None, "stream_options: usage comes with response.completed"),
    "prompt": (lambda v: v is None, "stored prompts are not supported"),
}
ROLES = ("user", "assistant", "system", "developer")


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request a Responses body amounts to; a field pdbox would not honour is a 400 naming it."""
    for name, value in body.items():
        if name in (*COPIED, "input", "instructions", "max_output_tokens", "text") or name in METADATA:
            continue
        if name not in NOOP:
            raise oai.ApiError(400, f"unrecognized request field {name!r} for /v1/responses", name)
        noop, why = NOOP[name]
        if not noop(value):
            raise oai.ApiError(400, f"{name}: {why}", name)
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise oai.ApiError(400, "instructions must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _messages(body.get("input"))
    chat: dict[str, Any] = {k: body[k] for k in COPIED if body.get(k) is not None}
    chat["messages"] = messages
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    fmt = _format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    return chat


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise oai.ApiError(400, "input must be a string or a non-empty list of messages", "input")
    out = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role") not in ROLES:
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise oai.ApiError(400, f"{where} must be a message with a role among {', '.join(ROLES)} (pdbox serves "
                                    f"text messages; got {kind!r})", "input")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text") \
                        or not isinstance(part.get("text"), str):
                    raise oai.ApiError(400, f"{where}.content[{j}] must be an input_text or output_text part "
                                            "(pdbox serves text)", "input")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise oai.ApiError(400, f"{where}.content must be a string or a list of text parts", "input")
        out.append({"role": item["role"], "content": content})
    return out


def _format(text: Any) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (None: plain text)."""
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise oai.ApiError(400, "text must be an object with format", "text")
    if text.get("verbosity") is not None:
        raise oai.ApiError(400, "text.verbosity is not supported", "text")
    fmt = text.get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict):
        raise oai.ApiError(400, "text.format must be an object", "text")
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise oai.ApiError(400, f"text.format type {fmt.get('type')!r} is not one of text, json_object, json_schema",
                       "text")


def parse(body: dict[str, Any], tokenizer: Any, served: str, max_model_len: int, **kw: Any) -> oai.ParsedRequest:
    """The body as a parsed chat request, its errors named in the Responses API's words."""
    chat = chat_body(body)
    try:
        return oai.parse_chat(chat, tokenizer, served, max_model_len, **kw)
    except oai.ApiError as exc:  # in the chat body's words
        param = CHAT_PARAMS.get((exc.param or "").split("[")[0].split(".")[0], exc.param)
        message = exc.message
        for chat, ours in CHAT_PARAMS.items():
            message = message.replace(chat, ours)
        raise oai.ApiError(exc.status, message, param, exc.kind, exc.headers) from None


def new_id() -> str:
    return f"resp_{secrets.token_hex(12)}"


def response(rid: str, parsed: oai.ParsedRequest, body: dict[str, Any], created: int, text: str | None,
             outcome: Outcome | None) -> dict[str, Any]:
    """A Response object: in progress (``outcome`` None) or done, its text the message's one part."""
    status = "in_progress" if outcome is None else (
        "incomplete" if outcome.finish_reason == "length" else "completed")
    output = [] if text is None else [message(rid, text, status)]
    out: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": parsed.model, "output": output, "parallel_tool_calls": False, "previous_response_id": None,
        "temperature": parsed.sampling.temperature, "top_p": parsed.sampling.top_p, "tool_choice": "none",
        "tools": [], "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
        "metadata": body.get("metadata") or {}, "store": False, "usage": None,
    }
    if outcome is not None:
        prompt, completion, cached = totals([outcome])
        out["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": prompt + completion}
    return out


def message(rid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + rid.removeprefix("resp_"), "status": status, "role": "assistant",
            "content": [output_text(text)]}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def whole(rid: str, parsed: oai.ParsedRequest, body: dict[str, Any], choice: Choice, outcome: Outcome
          ) -> dict[str, Any]:
    """The whole answer (not streamed)."""
    return response(rid, parsed, body, int(time.time()), "".join(choice.content), outcome)


class ResponsesStream:
    """The Responses API's events (`appliance.serve.sse_formats.StreamFormat`): the response created, its
    message and text part added, a delta per piece of text, then each done, and the response completed
    (or incomplete, at max_output_tokens) with its usage."""

    def __init__(self, rid: str, parsed: oai.ParsedRequest, body: dict[str, Any]) -> None:
        self.rid, self.parsed, self.body = rid, parsed, body
        self.created = int(time.time())
        self.seq = 0
        self.text: list[str] = []
        self.item_id = message(rid, "", "in_progress")["id"]

    def _event(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return sse(obj, event=kind)

    def _part(self, kind: str, text: str) -> bytes:
        return self._event(kind, item_id=self.item_id, output_index=0, content_index=0, part=output_text(text))

    def opening(self) -> list[bytes]:
        start = response(self.rid, self.parsed, self.body, self.created, None, None)
        item = message(self.rid, "", "in_progress")
        item["content"] = []
        return [self._event("response.created", response=start), self._event("response.in_progress", response=start),
                self._event("response.output_item.added", output_index=0, item=item),
                self._part("response.content_part.added", "")]

    def pieces(self, k: int, pieces: list[Piece]) -> list[bytes]:
        out = []
        for p in pieces:
            if p.text:
                self.text.append(p.text)
                out.append(self._event("response.output_text.delta", item_id=self.item_id, output_index=0,
                                       content_index=0, delta=p.text, logprobs=[]))
        return out

    def closing(self, outcomes: list[Outcome]) -> list[bytes]:
        text = "".join(self.text)
        final = response(self.rid, self.parsed, self.body, self.created, text, outcomes[0])
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return [self._event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                            text=text, logprobs=[]),
                self._part("response.content_part.done", text),
                self._event("response.output_item.done", output_index=0, item=final["output"][0]),
                self._event(kind, response=final)]

    def failure(self, err: oai.ApiError) -> list[bytes]:
        return [self._event("error", code=str(err.status), message=err.message, param=err.param)]

"""/v1/responses' answers: the Response object (its message and function_call items, usage, the text's
logprobs), whole or streamed as the Responses API's typed events (`ResponsesStream`). The request side is
`appliance.serve.responses_api`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from appliance.serve import openai_api as oai
from appliance.serve import responses_tools as rt
from appliance.serve.choices import Choice, Piece
from appliance.serve.relay import Outcome
from appliance.serve.sse_formats import sse, totals
from appliance.serve.tool_calls import ToolCall


def status_of(outcome: Outcome | None) -> str:
    if outcome is None:
        return "in_progress"
    return "incomplete" if outcome.finish_reason == "length" else "completed"


def output_items(rid: str, text: str, calls: list[ToolCall], status: str,
                 logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The answer's items: its message (when it has text, or made no call), then one per call."""
    return ([message(rid, text, status, logprobs)] if text or not calls else []) + rt.call_items(calls)


def response(rid: str, parsed: oai.ParsedRequest, body: dict[str, Any], created: int,
             output: list[dict[str, Any]], outcome: Outcome | None, stored: bool = False) -> dict[str, Any]:
    """A Response object: in progress (``outcome`` None) or done, with its ``output`` items."""
    status = status_of(outcome)
    out: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": parsed.model, "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"), "temperature": parsed.sampling.temperature,
        "top_p": parsed.sampling.top_p,
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
        "metadata": body.get("metadata") or {}, "store": stored, "usage": None,
    }
    if outcome is not None:
        prompt, completion, cached = totals([outcome])
        out["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": prompt + completion}
    return out


def message(rid: str, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "message", "id": "msg_" + rid.removeprefix("resp_"), "status": status, "role": "assistant",
            "content": [output_text(text, logprobs)]}


def output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def text_logprobs(parsed: oai.ParsedRequest, tokenizer: Any, entries: list[dict]) -> list[dict[str, Any]]:
    """The Responses API's logprobs of generated tokens: chat's entries (token, logprob, bytes, top_logprobs)."""
    chat = oai.format_logprobs(parsed, tokenizer, entries)
    return [] if chat is None else chat["content"]


Keep = Callable[[dict[str, Any]], None]  # stores a finished Response object


def whole(rid: str, parsed: oai.ParsedRequest, body: dict[str, Any], choice: Choice, outcome: Outcome,
          tokenizer: Any, keep: Keep | None = None) -> dict[str, Any]:
    """The whole answer (not streamed); ``keep`` (when it is stored) gets it."""
    output = output_items(rid, "".join(choice.content), choice.calls, status_of(outcome),
                          text_logprobs(parsed, tokenizer, choice.logprobs))
    out = response(rid, parsed, body, int(time.time()), output, outcome, keep is not None)
    if keep is not None:
        keep(out)
    return out


class ResponsesStream:
    """The Responses API's events (`appliance.serve.sse_formats.StreamFormat`): the response created, its
    items added as the answer makes them (a message and its text part, a delta per piece of text; a call
    when its name is known, closing the message before it, then deltas of its arguments), each done, and
    the response completed (or incomplete, at max_output_tokens) with its usage. Without tools the message
    is added at once, before the first token."""

    def __init__(self, rid: str, parsed: oai.ParsedRequest, body: dict[str, Any], tokenizer: Any = None,
                 keep: Keep | None = None) -> None:
        self.rid, self.parsed, self.body, self.tok, self.keep = rid, parsed, body, tokenizer, keep
        self.created = int(time.time())
        self.seq = 0
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []  # the text's, when asked for
        self.item_id = message(rid, "", "in_progress")["id"]
        self.items: list[dict[str, Any]] = []  # the output items so far, in order
        self.msg: int | None = None  # the open message's output index
        self.calls: dict[int, int] = {}  # a call's index in the answer -> its output index
        self.eager = parsed.tools is None or not parsed.tools.parses

    def _event(self, kind: str, **fields: Any) -> bytes:
        obj = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return sse(obj, event=kind)

    def _part(self, kind: str, text: str) -> bytes:
        return self._event(kind, item_id=self.item_id, output_index=self.msg, content_index=0, part=output_text(text))

    def opening(self) -> list[bytes]:
        start = response(self.rid, self.parsed, self.body, self.created, [], None, self.keep is not None)
        out = [self._event("response.created", response=start), self._event("response.in_progress", response=start)]
        return out + (self._open_message() if self.eager else [])

    def _open_message(self) -> list[bytes]:
        self.msg = len(self.items)
        item = message(self.rid, "", "in_progress")
        item["content"] = []
        self.items.append(item)
        return [self._event("response.output_item.added", output_index=self.msg, item=item),
                self._part("response.content_part.added", "")]

    def _close_message(self, status: str) -> list[bytes]:
        if self.msg is None:
            return []
        text = "".join(self.text)
        self.items[self.msg] = item = message(self.rid, text, status, self.logprobs)
        out = [self._event("response.output_text.done", item_id=self.item_id, output_index=self.msg, content_index=0,
                           text=text, logprobs=self.logprobs),
               self._part("response.content_part.done", text),
               self._event("response.output_item.done", output_index=self.msg, item=item)]
        self.msg = None
        return out

    def _call(self, delta: dict[str, Any]) -> list[bytes]:
        """One of chat's ``tool_calls`` deltas: the call's item added at its first, its arguments' delta."""
        i, fn = delta.get("index", 0), delta.get("function") or {}
        out = []
        if i not in self.calls:
            out += self._close_message("completed")
            self.calls[i] = len(self.items)
            self.items.append(rt.call_item(delta["id"], fn.get("name", ""), "", "in_progress"))
            out.append(self._event("response.output_item.added", output_index=self.calls[i], item=self.items[-1]))
        args = fn.get("arguments") or ""
        if args:
            item = self.items[self.calls[i]]
            item["arguments"] += args
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=self.calls[i], delta=args))
        return out

    def pieces(self, k: int, pieces: list[Piece]) -> list[bytes]:
        out = []
        for p in pieces:
            logprobs = text_logprobs(self.parsed, self.tok, p.logprobs) if p.logprobs else []
            self.logprobs += logprobs
            if p.text or logprobs:
                if self.msg is None:
                    out += self._open_message()
                self.text.append(p.text)
                out.append(self._event("response.output_text.delta", item_id=self.item_id, output_index=self.msg,
                                       content_index=0, delta=p.text, logprobs=logprobs))
            for delta in p.tool_calls:
                out += self._call(delta)
        return out

    def closing(self, outcomes: list[Outcome]) -> list[bytes]:
        out = [] if self.items else self._open_message()  # an empty answer is an empty message
        out += self._close_message(status_of(outcomes[0]))
        for i in sorted(self.calls.values()):
            item = {**self.items[i], "status": "completed"}
            self.items[i] = item
            out += [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=i, item=item)]
        final = response(self.rid, self.parsed, self.body, self.created, self.items, outcomes[0],
                         self.keep is not None)
        if self.keep is not None:
            self.keep(final)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return out + [self._event(kind, response=final)]

    def failure(self, err: oai.ApiError) -> list[bytes]:
        return [self._event("error", code=str(err.status), message=err.message, param=err.param)]

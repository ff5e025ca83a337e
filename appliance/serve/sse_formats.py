"""How an answer's pieces become Server-Sent Events: one format per API, the same driver for all
(`ResponseWriter.stream`: deadlines, errors, aborts). A format turns pieces into encoded events and
says what opens the stream, what closes it, and what a failure after the first byte sends.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from appliance.serve import openai_api as oai
from appliance.serve.choices import Piece
from appliance.serve.relay import Outcome

DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    """One event: ``data: {json}`` (after ``event: NAME`` when the API names its events)."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def totals(outcomes: list[Outcome]) -> tuple[int, int, int]:
    """Prompt, completion and cached tokens over several prompts' outcomes (``oai.usage``'s arguments)."""
    return (sum(o.prompt_tokens for o in outcomes), sum(o.completion_tokens for o in outcomes),
            sum(o.cached_tokens for o in outcomes))


class StreamFormat(Protocol):
    def opening(self) -> list[bytes]:
        """Sent before the first piece."""
        ...

    def pieces(self, k: int, pieces: list[Piece]) -> list[bytes]:
        """Prompt ``k``'s pieces (``k`` > 0 only for a /v1/completions batch)."""
        ...

    def closing(self, outcomes: list[Outcome]) -> list[bytes]:
        """Sent after the last piece: every prompt's outcome is known."""
        ...

    def failure(self, err: oai.ApiError) -> list[bytes]:
        """Sent when the answer fails after its first byte."""
        ...


class ChatStream:
    """/v1/chat/completions and /v1/completions chunks, ``data: [DONE]`` last; several prompts' choices
    numbered one after the other."""

    def __init__(self, tokenizer: Any, parts: list[oai.ParsedRequest], rid: str) -> None:
        self.tok = tokenizer
        self.parsed = parts[0]
        self.rid = rid
        self.created = int(time.time())
        self.offsets = [sum(p.n for p in parts[:k]) for k in range(len(parts))]
        self.started: set[int] = set()  # choices whose first chunk (with the role) went out

    def opening(self) -> list[bytes]:
        return []

    def pieces(self, k: int, pieces: list[Piece]) -> list[bytes]:
        parsed, rid, created = self.parsed, self.rid, self.created
        out = []
        for p in pieces:
            index = self.offsets[k] + p.index
            first = index not in self.started
            if p.text or p.logprobs or first:
                logprobs = oai.format_logprobs(parsed, self.tok, p.logprobs)
                out.append(sse(oai.chunk(parsed, rid, created, p.text, None, first, logprobs, index)))
                self.started.add(index)
            if p.tool_calls:
                out.append(sse(oai.chunk(parsed, rid, created, None, None, index=index, tool_calls=p.tool_calls)))
            if p.finish is not None:
                text = None if parsed.endpoint == "chat" else ""
                out.append(sse(oai.chunk(parsed, rid, created, text, p.finish, index=index)))
        return out

    def closing(self, outcomes: list[Outcome]) -> list[bytes]:
        if not self.parsed.include_usage:
            return [DONE]
        use = oai.usage(*totals(outcomes))
        return [sse(oai.usage_chunk(self.parsed, self.rid, self.created, use)), DONE]

    def failure(self, err: oai.ApiError) -> list[bytes]:
        return [sse(err.body()), DONE]

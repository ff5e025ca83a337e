"""One choice of an answer as it arrives: its text (stop strings applied), logprobs, tool calls and end.

A request with ``n`` samples has ``n`` of these, fed by the worker events of their ``index``. Text is
released as the detokenizer finds it stable; with tools it passes through a `ToolStream`, which holds
back what may be a call and parses the calls at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from appliance.serve import openai_api as oai
from appliance.serve.detok import IncrementalText
from appliance.serve.tool_calls import CallDeltas, ToolCall, ToolStream


@dataclass
class Piece:
    """What one choice adds to the answer now: text, logprobs entries, and at its end the finish reason
    and the tool calls (as OpenAI ``tool_calls`` objects)."""

    index: int
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class Choice:
    def __init__(self, index: int, parsed: oai.ParsedRequest, tokenizer: Any) -> None:
        self.index = index
        self.text = IncrementalText(tokenizer, parsed.sampling.stop, parsed.sampling.min_tokens)
        tools = parsed.tools
        self.tools = ToolStream(tools) if tools is not None and tools.parses else None
        self.deltas = CallDeltas() if tools is not None and tools.enforced else None  # streamed as generated
        self.tokens = 0
        self.finish: str | None = None
        self.content: list[str] = []
        self.logprobs: list[dict] = []  # the generated tokens' (best_of ranks by them)
        self.calls: list[ToolCall] = []
        self.echo = parsed.echo  # echo: the prompt's text, put before this choice's first piece
        self.prompt_scores: list[dict] = []  # echo with logprobs: the prompt's entries, before the answer's
        self.echoed: list[dict] = []  # the prompt entries that went out with the first piece

    @property
    def over(self) -> bool:
        return self.finish is not None

    def feed(self, token_ids: list[int], logprobs: list[dict], finish: str | None) -> Piece:
        """Tokens of this choice (``finish``: the worker says it ended). Ends it when a stop string hits."""
        self.tokens += len(token_ids)
        delta = self.text.feed(token_ids)
        if self.text.stopped:
            finish = "stop"
        if finish is not None:
            return self.end(finish, delta, logprobs)
        return self._piece(delta, logprobs)

    def end(self, finish: str | None, delta: str = "", logprobs: list[dict] | None = None) -> Piece:
        """The end of this choice: the rest of its text, its calls, its finish reason."""
        if self.over:
            return Piece(self.index)
        delta += self.text.finish()
        piece = self._piece(delta, logprobs or [])
        if self.tools is not None:
            rest, self.calls = self.tools.finish()
            piece.text += rest
            self.content.append(rest)
            if self.deltas is not None and self.deltas.name is not None:  # the call went out as it grew
                piece.tool_calls += self.deltas.finish(self.tools.text)
                self.calls = [replace(c, id=self.deltas.id) for c in self.calls[:1]]
            else:
                piece.tool_calls = [dict(c.message(), index=i) for i, c in enumerate(self.calls)]
        self.finish = "tool_calls" if self.calls else (finish or "stop")
        piece.finish = self.finish
        return piece

    def _piece(self, delta: str, logprobs: list[dict]) -> Piece:
        calls: list[dict[str, Any]] = []
        if self.tools is not None:
            delta = self.tools.feed(delta)
            if self.deltas is not None:
                calls = self.deltas.feed(self.tools.text)
        out = list(logprobs)
        if self.echo is not None:  # the first piece: the prompt comes first
            delta, self.echo = self.echo + delta, None
            self.echoed = self.prompt_scores
            out = self.echoed + out
        self.content.append(delta)
        self.logprobs.extend(logprobs)
        return Piece(self.index, delta, out, tool_calls=calls)

    def body(self, parsed: oai.ParsedRequest, tokenizer: Any) -> dict[str, Any]:
        """This choice in a whole (non-streamed) answer."""
        text: str | None = "".join(self.content)
        if self.calls and not text:
            text = None
        return oai.choice_body(parsed, self.index, text, self.finish,
                               oai.format_logprobs(parsed, tokenizer, self.echoed + self.logprobs),
                               [c.message() for c in self.calls] or None)

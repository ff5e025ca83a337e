"""The router's answer for n samples and tool calls, from synthetic worker events (no engine): one choice
per index, a sample's end event ends only its choice, stop strings cut per choice, usage sums the
samples, and an enforced call comes back in ``message.tool_calls`` (streamed: ``delta.tool_calls``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from appliance.serve.choices import Choice
from appliance.serve.openai_api import ParsedRequest
from appliance.serve.protocol import Sampling, Tokens
from appliance.serve.relay import Outcome, Relayed
from appliance.serve.responses import ResponseWriter
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.tools import parse_tools

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


class CharTokenizer:
    """Token id = one character's code point."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


async def events(evs: list[Relayed]) -> AsyncIterator[Relayed]:
    for ev in evs:
        yield ev


def collect(parsed: ParsedRequest, evs: list[Relayed]) -> dict:
    writer = ResponseWriter(RouterConfig(), CharTokenizer(), RouterMetrics())
    resp = asyncio.run(writer.collect([(parsed, events(evs))], "chatcmpl-x"))
    return json.loads(resp.body)


def request(n: int = 1, stop: tuple[str, ...] = (), tools=None) -> ParsedRequest:
    return ParsedRequest("chat", "m", [1, 2, 3], Sampling(n=n, stop=list(stop)), False, False, False, tools)


def test_two_samples_are_two_choices() -> None:
    body = collect(request(n=2, stop=("!",)), [
        Tokens(token_ids=ids("ab"), index=0), Tokens(token_ids=ids("xy!z"), index=1),
        Tokens(index=1, finish_reason="stop"),
        Tokens(token_ids=ids("c"), index=0), Tokens(index=0, finish_reason="length"),
        Outcome("length", 3, 0)])
    got = [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]]
    assert got == [(0, "abc", "length"), (1, "xy", "stop")]
    assert body["usage"]["completion_tokens"] == 7 and body["usage"]["prompt_tokens"] == 3


def test_an_enforced_call_is_parsed_into_tool_calls() -> None:
    tools = parse_tools({"tools": [TOOL], "tool_choice": "required"}, "")
    call = '{"name": "f", "arguments": {"a": 1}}'
    body = collect(request(tools=tools), [Tokens(token_ids=ids(call)), Outcome("stop", 3, 0)])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (tc,) = choice["message"]["tool_calls"]
    assert tc["function"]["name"] == "f" and json.loads(tc["function"]["arguments"]) == {"a": 1}


def test_a_streamed_choice_ends_with_its_calls() -> None:
    tools = parse_tools({"tools": [TOOL]}, "")  # auto
    c = Choice(0, request(tools=tools), CharTokenizer())
    first = c.feed(ids("Ok. <tool_call>"), [], None)
    assert first.text == "Ok. " and not first.tool_calls
    c.feed(ids('{"name": "f", "arguments": {}}</tool_call>'), [], None)
    end = c.end("stop")
    assert end.finish == "tool_calls" and end.tool_calls[0]["index"] == 0
    assert end.tool_calls[0]["function"] == {"name": "f", "arguments": "{}"}


def test_an_enforced_call_streams_as_it_is_generated() -> None:
    tools = parse_tools({"tools": [TOOL], "tool_choice": "required"}, "")
    c = Choice(0, request(tools=tools), CharTokenizer())
    pieces = [c.feed(ids(t), [], None) for t in ('{"name": "f", ', '"arguments": {"a"', ": 1}}")] + [c.end("stop")]
    calls = [tc for p in pieces for tc in p.tool_calls]
    assert calls[0]["function"] == {"name": "f", "arguments": ""} and all(not p.text for p in pieces)
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"a": 1}'
    assert pieces[-1].finish == "tool_calls" and c.calls[0].id == calls[0]["id"]


def test_best_of_returns_the_likeliest_samples() -> None:
    parsed = ParsedRequest("completions", "m", [1, 2, 3], Sampling(n=3, logprobs=0), False, False, False, keep=1)
    lp = [{"token_id": 0, "logprob": -1.0, "top": []}]
    body = collect(parsed, [
        Tokens(token_ids=ids("a"), logprobs=lp * 1, index=0),
        Tokens(token_ids=ids("b"), logprobs=[{**lp[0], "logprob": -0.1}], index=1),
        Tokens(token_ids=ids("c"), logprobs=[{**lp[0], "logprob": -3.0}], index=2),
        *(Tokens(index=i, finish_reason="length") for i in range(3)), Outcome("length", 3, 0)])
    assert [(c["index"], c["text"], c["logprobs"]) for c in body["choices"]] == [(0, "b", None)]
    assert body["usage"]["completion_tokens"] == 3

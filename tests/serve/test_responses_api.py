"""/v1/responses read as the chat request it amounts to (`appliance.serve.responses_api`): the mapping,
every refusal naming its field in the Responses API's words, and the stream's events in order."""

from __future__ import annotations

import json

import pytest

from appliance.serve import openai_api as oai
from appliance.serve import responses_api as ra
from appliance.serve.choices import Piece
from appliance.serve.protocol import Sampling
from appliance.serve.relay import Outcome


class Tok:
    vocab_size = 100
    chat_template = ""

    def encode_chat(self, messages, tools=None):
        return [1] * (1 + sum(len(m["content"]) for m in messages))


def test_a_body_becomes_the_chat_request_it_amounts_to() -> None:
    body = {"model": "m", "input": [{"role": "user", "content": "hi"},
                                   {"type": "message", "role": "assistant",
                                    "content": [{"type": "output_text", "text": "he"}, {"type": "output_text",
                                                                                        "text": "llo"}]}],
            "instructions": "be brief", "max_output_tokens": 5, "temperature": 0, "top_p": 0.5, "stream": True,
            "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}},
            "metadata": {"a": "b"}, "store": False, "tools": [], "tool_choice": "auto"}
    assert ra.chat_body(body) == {
        "model": "m", "temperature": 0, "top_p": 0.5, "stream": True, "max_tokens": 5,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"},
                                                                   "strict": True}}}
    assert ra.chat_body({"input": "hi"}) == {"messages": [{"role": "user", "content": "hi"}]}
    assert ra.chat_body({"input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"input": "x", "store": True}, "store", "store false"),
    ({"input": "x", "conversation": "c"}, "conversation", "keeps no conversations"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "chat/completions"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning", "not supported"),
    ({"input": "x", "max_tokens": 3}, "max_tokens", "unrecognized request field"),
    ({"input": [{"type": "input_image", "image_url": "u"}]}, "input", "text messages"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input", "input_text"),
    ({"input": []}, "input", "non-empty"),
    ({"input": 3}, "input", "string"),
    ({"input": "x", "instructions": 5}, "instructions", "string"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text", "not one of"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be >= 1"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens", "max_output_tokens is 1000000"),
    ({"input": "x", "temperature": -1}, "temperature", "temperature"),
])
def test_refusals_name_the_responses_field(body: dict, param: str, message: str) -> None:
    with pytest.raises(oai.ApiError, match=message) as info:
        ra.parse(body, Tok(), "m", 64)
    assert info.value.status == 400 and info.value.param == param


def parsed() -> oai.ParsedRequest:
    return oai.ParsedRequest("chat", "m", [1, 2], Sampling(temperature=0.0), True, False, False)


def events(raw: list[bytes]) -> list[dict]:
    out = []
    for block in raw:
        head, data = block.decode().strip().split("\n")
        ev = json.loads(data.removeprefix("data: "))
        assert head == f"event: {ev['type']}"
        out.append(ev)
    return out


def test_the_stream_sends_the_lifecycle_in_order_with_the_text_and_usage() -> None:
    s = ra.ResponsesStream("resp_abc", parsed(), {"input": "hi"})
    raw = s.opening() + s.pieces(0, [Piece(0, "Hel"), Piece(0, "")]) + s.pieces(0, [Piece(0, "lo", finish="stop")])
    raw += s.closing([Outcome("stop", 2, 1, 3)])
    evs = events(raw)
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta") == "Hello"
    final = evs[-1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"] == {"input_tokens": 2, "input_tokens_details": {"cached_tokens": 1}, "output_tokens": 3,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 5}
    assert evs[0]["response"]["status"] == "in_progress" and evs[0]["response"]["id"] == final["id"] == "resp_abc"
    cut = ra.ResponsesStream("resp_x", parsed(), {"input": "hi", "max_output_tokens": 1})
    last = events(cut.opening() + cut.closing([Outcome("length", 2, 0, 1)]))[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    failed = events(ra.ResponsesStream("resp_y", parsed(), {}).failure(oai.ApiError(502, "worker failed: x")))
    assert failed == [{"type": "error", "code": "502", "message": "worker failed: x", "param": None,
                       "sequence_number": 0}]

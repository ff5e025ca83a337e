"""/v1/responses read as the chat request it amounts to (`appliance.serve.responses_api`): the mapping,
function tools and their input items, every refusal naming its field in the Responses API's words, and
the stream's events in order, with and without calls."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from appliance.serve import openai_api as oai
from appliance.serve import responses_api as ra
from appliance.serve import responses_out as ro
from appliance.serve.choices import Piece
from appliance.serve.protocol import Sampling
from appliance.serve.relay import Outcome

WEATHER = {"type": "function", "name": "weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


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
                     {"role": "assistant", "content": "hello"}], "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"},
                                                                   "strict": True}}}
    assert ra.chat_body({"input": "hi"}) == {"messages": [{"role": "user", "content": "hi"}]}
    assert ra.chat_body({"input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"input": "x", "metadata": 5}, "metadata", "an object of at most 16"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata", "values strings"),
    ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
    ({"input": "x", "user": 7}, "user", "user must be a string"),
    ({"input": "x", "conversation": "c"}, "conversation", "keeps no conversation objects"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "'web_search' tool: pdbox serves function tools"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "function": {}}]}, "tools", "unknown fields: function"),
    ({"input": "x", "tools": [{"type": "function", "name": "f g"}]}, "tools", r"tools\[0\]\.name must be 1-64"),
    ({"input": "x", "tools": {"type": "function"}}, "tools", "must be a list"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "weather"}}},
     "tool_choice", "tool_choice must be none, auto"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice",
     "names 'other', which is not among tools"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"input": "x", "tools": [WEATHER], "max_tool_calls": 2}, "max_tool_calls", "not supported"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "weather", "arguments": "{"}]}, "input",
     r"input\[0\]\.arguments is not JSON"),
    ({"input": [{"type": "function_call", "name": "weather", "arguments": "{}"}]}, "input",
     r"input\[0\]\.call_id must be a string"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input",
     r"input\[0\]\.output must be a string"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning", "not supported"),
    ({"input": "x", "max_tokens": 3}, "max_tokens", "unrecognized request field"),
    ({"input": [{"type": "input_image", "image_url": "u"}]}, "input", "text and function tools; got 'input_image'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input", "input_text"),
    ({"input": []}, "input", "non-empty"),
    ({"input": 3}, "input", "string"),
    ({"input": "x", "instructions": 5}, "instructions", "string"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text", "not one of"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be >= 1"),
    ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens", "max_output_tokens is 1000000"),
    ({"input": "x", "temperature": -1}, "temperature", "temperature"),
    # a falsy top_logprobs of the wrong type beside include: refused, not read as 0 (the fuzzer's 0.0)
    ({"input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 0.0}, "top_logprobs", "top_logprobs"),
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
    s = ro.ResponsesStream("resp_abc", parsed(), {"input": "hi"})
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
    cut = ro.ResponsesStream("resp_x", parsed(), {"input": "hi", "max_output_tokens": 1})
    last = events(cut.opening() + cut.closing([Outcome("length", 2, 0, 1)]))[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    failed = events(ro.ResponsesStream("resp_y", parsed(), {}).failure(oai.ApiError(502, "worker failed: x")))
    assert failed == [{"type": "error", "code": "502", "message": "worker failed: x", "param": None,
                       "sequence_number": 0}]


def test_function_tools_and_their_input_items_become_chat_s() -> None:
    call = {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}',
            "id": "fc_1", "status": "completed"}
    body = {"input": [{"role": "user", "content": "Weather in Paris and Rome?"},
                      {"role": "assistant", "content": "Looking."}, call,
                      {**call, "call_id": "call_2", "arguments": '{"city": "Rome"}'},
                      {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                      {"type": "function_call_output", "call_id": "call_2",
                       "output": [{"type": "input_text", "text": "rain"}]},
                      call],
            "tools": [WEATHER], "tool_choice": {"type": "function", "name": "weather"}, "parallel_tool_calls": False}
    chat = ra.chat_body(body)
    fn = {k: WEATHER[k] for k in ("name", "description", "parameters")}
    assert chat["tools"] == [{"type": "function", "function": fn}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["parallel_tool_calls"] is False
    paris = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    rome = {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}
    assert chat["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [paris, rome]},  # calls join the message before
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "assistant", "content": "", "tool_calls": [paris]}]  # no assistant message before: one of its own


def tool_parsed(choice: str = "auto") -> oai.ParsedRequest:
    from appliance.serve.tools import parse_tools

    body = {"tools": ra.chat_body({"input": "x", "tools": [WEATHER]})["tools"], "tool_choice": choice}
    return replace(parsed(), tools=parse_tools(body, ""))


def test_a_whole_answer_s_calls_are_function_call_items_after_its_text() -> None:
    from appliance.serve.tool_calls import ToolCall

    call = ToolCall("weather", '{"city": "Paris"}', "call_abc")
    body = {"input": "x", "tools": [WEATHER]}
    with_text = ro.output_items("resp_1", "Let me check.", [call], "completed")
    assert [i["type"] for i in with_text] == ["message", "function_call"]
    assert with_text[1] == {"type": "function_call", "id": "fc_abc", "call_id": "call_abc", "name": "weather",
                            "arguments": '{"city": "Paris"}', "status": "completed"}
    assert [i["type"] for i in ro.output_items("resp_1", "", [call], "completed")] == ["function_call"]
    assert [i["type"] for i in ro.output_items("resp_1", "", [], "completed")] == ["message"]
    r = ro.response("resp_1", tool_parsed(), body, 0, with_text, Outcome("tool_calls", 2, 0, 9))
    assert r["status"] == "completed" and r["tools"] == [WEATHER] and r["tool_choice"] == "auto"
    assert r["parallel_tool_calls"] is True


def test_the_stream_adds_a_call_s_item_and_streams_its_arguments() -> None:
    # auto: text first, then the call parsed at the end (chat's whole-call delta)
    s = ro.ResponsesStream("resp_t", tool_parsed(), {"input": "x", "tools": [WEATHER]})
    whole = {"index": 0, "id": "call_abc", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    evs = events(s.opening() + s.pieces(0, [Piece(0, "Let me check.")])
                 + s.pieces(0, [Piece(0, "", finish="tool_calls", tool_calls=[whole])])
                 + s.closing([Outcome("tool_calls", 2, 0, 9)]))
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    added = evs[8]
    assert added["output_index"] == 1 and added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
    final = evs[-1]["response"]["output"]
    assert final[0]["content"][0]["text"] == "Let me check." and final[0]["status"] == "completed"
    assert final[1] == {"type": "function_call", "id": "fc_abc", "call_id": "call_abc", "name": "weather",
                        "arguments": '{"city": "Paris"}', "status": "completed"}
    assert evs[11]["item"] == final[1] and evs[10]["arguments"] == '{"city": "Paris"}'

    # enforced: no message at all; the name first, then the arguments as they grow
    s = ro.ResponsesStream("resp_e", tool_parsed("required"), {"input": "x"})
    head = {"index": 0, "id": "call_e", "type": "function", "function": {"name": "weather", "arguments": ""}}
    parts = ['{"city": ', '"Ro', 'me"}']
    raw = s.opening() + s.pieces(0, [Piece(0, tool_calls=[head])])
    for a in parts:
        raw += s.pieces(0, [Piece(0, tool_calls=[{"index": 0, "function": {"arguments": a}}])])
    evs = events(raw + s.closing([Outcome("tool_calls", 2, 0, 7)]))
    kinds = [e["type"] for e in evs]
    assert "response.content_part.added" not in kinds and kinds[2] == "response.output_item.added"
    assert [e["delta"] for e in evs if e["type"] == "response.function_call_arguments.delta"] == parts
    assert [i["type"] for i in evs[-1]["response"]["output"]] == ["function_call"]
    assert evs[-1]["response"]["output"][0]["arguments"] == '{"city": "Rome"}'

    # tools, but the answer is empty: one empty message
    s = ro.ResponsesStream("resp_0", tool_parsed(), {"input": "x"})
    evs = events(s.opening() + s.closing([Outcome("stop", 2, 0, 1)]))
    assert [i["type"] for i in evs[-1]["response"]["output"]] == ["message"]
    assert [e["output_index"] for e in evs if "output_index" in e] == [0, 0, 0, 0, 0]


class LetterTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcdé"[i] for i in ids)


def test_logprobs_come_with_the_text_and_its_bytes() -> None:
    body = {"input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 1}
    assert ra.chat_body(body)["logprobs"] is True and ra.chat_body(body)["top_logprobs"] == 1
    assert ra.chat_body({"input": "x", "top_logprobs": 2})["logprobs"] is True  # alone, it asks too
    assert "logprobs" not in ra.chat_body({"input": "x", "top_logprobs": 0})
    p = replace(parsed(), want_logprobs=True)
    entries = [{"token_id": 4, "logprob": -0.5, "top": [(4, -0.5)]},
               {"token_id": 1, "logprob": -1.0, "top": [(0, -0.2)]}]
    s = ro.ResponsesStream("resp_l", p, body, LetterTok())
    evs = events(s.opening() + s.pieces(0, [Piece(0, "é", logprobs=entries[:1])])
                 + s.pieces(0, [Piece(0, "b", logprobs=entries[1:])]) + s.closing([Outcome("stop", 2, 0, 2)]))
    deltas = [e["logprobs"] for e in evs if e["type"] == "response.output_text.delta"]
    assert deltas == [[{"token": "é", "bytes": [0xC3, 0xA9], "logprob": -0.5,
                        "top_logprobs": [{"token": "é", "bytes": [0xC3, 0xA9], "logprob": -0.5}]}],
                      [{"token": "b", "bytes": [98], "logprob": -1.0,
                        "top_logprobs": [{"token": "a", "bytes": [97], "logprob": -0.2}]}]]
    done = next(e for e in evs if e["type"] == "response.output_text.done")
    assert done["logprobs"] == deltas[0] + deltas[1] == evs[-1]["response"]["output"][0]["content"][0]["logprobs"]
    assert ro.text_logprobs(parsed(), LetterTok(), entries) == []  # not asked for

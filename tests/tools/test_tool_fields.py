"""tools / tool_choice in a chat body: the prompt, the enforced call's constraint, the parser, the
streamed holdback, and bad values refused with a 400 naming the field."""

from __future__ import annotations

import json

import pytest

from appliance.engine.constraint import Constraint
from appliance.serve.openai_api import ApiError, parse_chat, parse_completion
from appliance.serve.tool_calls import ToolStream, parse_calls
from appliance.serve.tools import parse_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


class FakeTokenizer:
    vocab_size = 100
    chat_template = CHATML

    def __init__(self) -> None:
        self.seen: list = []

    def encode_chat(self, messages, tools=None):
        self.seen.append((messages, tools))
        return [1, 2, 3]

    def encode(self, text):
        return [1, 2, 3]

    encode_prompt = encode


def chat(tok: FakeTokenizer | None = None, **extra):
    body = {"messages": [{"role": "user", "content": "weather in Paris?"}], **extra}
    return parse_chat(body, tok or FakeTokenizer(), "m", 64)


def test_required_and_named_are_enforced_by_a_call_schema() -> None:
    req = chat(tools=[WEATHER, TIME], tool_choice="required")
    c = req.sampling.constraint
    assert req.tools is not None and req.tools.enforced and c is not None and c.kind == "json_schema"
    assert {o["properties"]["name"]["const"] for o in json.loads(c.spec)["anyOf"]} == {"get_weather", "get_time"}
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert json.loads(named.sampling.constraint.spec)["properties"]["name"] == {"const": "get_time"}
    Constraint("json_schema", named.sampling.constraint.spec)  # compiles
    assert chat(tools=[WEATHER]).sampling.constraint is None  # auto: free text, parsed
    assert chat(tools=[WEATHER], tool_choice="none").tools.parses is False


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    tok = FakeTokenizer()
    chat(tok, tools=[WEATHER])
    messages, variable = tok.seen[-1]
    assert variable is None and messages[0]["role"] == "system" and "<tools>" in messages[0]["content"]
    assert "get_weather" in messages[0]["content"]
    chat(tok, tools=[WEATHER], tool_choice="none")
    assert tok.seen[-1][0][0]["role"] == "user"  # none: the tools are not shown


def test_a_template_that_renders_tools_gets_the_variable() -> None:
    tok = FakeTokenizer()
    tok.chat_template = CHATML + "{% if tools %}{{ tools | tojson }}{% endif %}"
    chat(tok, tools=[WEATHER])
    assert tok.seen[-1][1] == [WEATHER]


def test_history_with_calls_and_results() -> None:
    tok = FakeTokenizer()
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat(tok, tools=[WEATHER], messages=[
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    msgs = tok.seen[-1][0]
    assert "<tool_call>" in msgs[2]["content"] and '"Paris"' in msgs[2]["content"]
    assert msgs[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


@pytest.mark.parametrize("extra,param", [
    (dict(tools={"type": "function"}), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools"),
    (dict(tools=[WEATHER, WEATHER]), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nosuch"}}}],
          tool_choice="required"), "tools"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="always"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(tools=[WEATHER], parallel_tool_calls="yes"), "parallel_tool_calls"),
    (dict(functions=[{"name": "f"}]), "functions"),
    (dict(n=0), "n"), (dict(n=9), "n"), (dict(n="2"), "n"), (dict(best_of=2), "best_of"),  # chat: no best_of
])
def test_bad_values_are_a_400_naming_the_field(extra, param) -> None:
    with pytest.raises(ApiError) as info:
        chat(**extra)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def completion(**extra):
    return parse_completion({"prompt": "x", **extra}, FakeTokenizer(), "m", 64, 100)


def test_completions_refuse_tools_and_take_n_and_best_of() -> None:
    with pytest.raises(ApiError) as info:
        completion(tools=[WEATHER])
    assert info.value.param == "tools"
    assert completion(n=3).n == 3 and completion(n=3).keep is None
    best = completion(n=2, best_of=5)
    assert best.n == 5 and best.keep == 2 and best.sampling.logprobs == 0 and not best.want_logprobs
    assert completion(best_of=1).keep is None
    for bad in (dict(n=3, best_of=2), dict(best_of=9), dict(best_of=0), dict(best_of=3, stream=True)):
        with pytest.raises(ApiError) as info:
            completion(**bad)
        assert info.value.param == "best_of", bad


def test_both_formats_parse() -> None:
    tools = parse_tools({"tools": [WEATHER, TIME]}, CHATML)
    content, calls = parse_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                 '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', tools)
    assert content == "Let me look." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].id.startswith("call_")
    _, calls = parse_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', tools)
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert parse_calls('{"name": "unknown", "arguments": {}}', tools)[1] == []
    assert parse_calls("Paris is sunny.", tools) == ("Paris is sunny.", [])


def test_the_stream_holds_back_what_may_be_a_call() -> None:
    tools = parse_tools({"tools": [WEATHER]}, CHATML)
    s = ToolStream(tools)
    out = "".join(s.feed(d) for d in ["Sure", ", checking.", " <tool", "_call>", '{"name": "get_weather", ',
                                       '"arguments": {"city": "Rome"}}', "</tool_call>"])
    assert out == "Sure, checking. "
    rest, calls = s.finish()
    assert rest == "" and calls[0].name == "get_weather"
    plain = ToolStream(tools)
    assert plain.feed("Hello") == "Hello" and plain.feed(" <to") == " " and plain.finish() == ("<to", [])
    forced = ToolStream(parse_tools({"tools": [WEATHER], "tool_choice": "required"}, CHATML))
    assert forced.feed('{"name": "get_weather", "arguments": {"city": "X"}}') == ""
    assert forced.finish()[1][0].name == "get_weather"


def test_an_enforced_call_streams_its_name_then_its_arguments() -> None:
    from appliance.serve.tool_calls import CallDeltas

    text, deltas, d = "", [], CallDeltas()
    for piece in ['{"name": "get_', 'weather", "argu', 'ments": {"ci', 'ty": "Pa', 'ris"}', "}"]:
        text += piece
        deltas += d.feed(text)
    deltas += d.finish(text)
    assert deltas[0] == {"index": 0, "id": d.id, "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
    assert len(deltas) > 3 and all("name" not in x["function"] for x in deltas[1:])
    assert "".join(x["function"]["arguments"] for x in deltas) == '{"city": "Paris"}'
    cut, c = '{"name": "f", "arguments": {"a": {}', CallDeltas()
    assert "".join(x["function"]["arguments"] for x in c.feed(cut) + c.finish(cut)) == '{"a": {}'

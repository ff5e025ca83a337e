"""Tool calls end to end: `pdbox up` (unified and disaggregated), the embedded SmolLM2-135M, the real `openai`
client. ``required`` and a named function are enforced by constrained decoding, so even this model
returns a well-formed call: parsed into ``message.tool_calls`` (valid JSON arguments matching the tool's
schema), ``finish_reason`` ``tool_calls``, and as ``delta.tool_calls`` when streamed. Bad tool fields
are a 400 naming the field."""

from __future__ import annotations

import json

import openai
import pytest

from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
MAX_TOKENS = 40


def _check_call(call, names: set[str]) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    key = "city" if call.function.name == "get_weather" else "zone"
    assert set(args) == {key} and isinstance(args[key], str)
    return args


def check_tools(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    req = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER, TIME],
                                         tool_choice="required", max_tokens=MAX_TOKENS, temperature=0)
    choice = req.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1 and not choice.message.content
    _check_call(choice.message.tool_calls[0], {"get_weather", "get_time"})

    named = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], max_tokens=MAX_TOKENS, temperature=0.8, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.choices[0].finish_reason == "tool_calls"
    _check_call(named.choices[0].message.tool_calls[0], {"get_time"})

    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required",
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    deltas, finish = [], None
    for ch in stream:
        for c in ch.choices:
            deltas.extend(c.delta.tool_calls or [])
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and deltas, deltas
    assert deltas[0].function.name == "get_weather" and deltas[0].index == 0
    args = "".join(d.function.arguments or "" for d in deltas)
    assert set(json.loads(args)) == {"city"}

    # a conversation that goes on after the call's result; auto may answer in text
    call = choice.message.tool_calls[0]
    after = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, tools=[WEATHER, TIME], messages=[
        *QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")

    for bad, param in ((dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                        "tool_choice"),
                       (dict(tools={"type": "function"}), "tools"),
                       (dict(tool_choice="required"), "tool_choice")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, **bad)
        assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
    assert_pools_idle(url)


@pytest.mark.parametrize("mode", ["unified", "disagg"])
def test_tool_calls_with_the_openai_client(mode: str) -> None:
    with running_appliance("--mode", mode) as url:
        check_tools(url)

"""/v1/responses end to end: `pdbox up` (disaggregated), the embedded SmolLM2, the real `openai` client's
`responses.create`, its stream, its stream helper and `responses.parse` with a pydantic model. A greedy
response is the chat completion of the same messages; a refused field is a 400 naming it; a stored response
is retrieved, continued by previous_response_id (as chat continues the whole conversation) and deleted.
Function tools:
an enforced call comes back as a `function_call` item whose arguments match the tool's schema (streamed:
its arguments' deltas join to them), and its output sent back as input items gets a text answer equal to
the chat completion of the same conversation."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


class Person(pydantic.BaseModel):
    name: str
    age: int


WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


@pytest.fixture(scope="module")
def url():
    with running_appliance() as u:
        yield u


def test_the_responses_api_with_the_openai_client(url) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.responses.create(model=MODEL, instructions="Answer briefly.", input="What is the capital of France?",
                                max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens

    kinds, deltas, final = [], [], None
    for ev in client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=6, temperature=0,
                                      stream=True):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        if ev.type in ("response.completed", "response.incomplete"):
            final = ev.response
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete") and final is not None
    assert "".join(deltas) == final.output_text and final.usage.output_tokens <= 6

    scored = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0,
                                     include=["message.output_text.logprobs"], top_logprobs=2)
    chat_lp = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                                             messages=[{"role": "user", "content": "Say hello."}])
    lps = scored.output[0].content[0].logprobs
    want = chat_lp.choices[0].logprobs.content
    assert lps and [(e.token, round(e.logprob, 4)) for e in lps] == [(e.token, round(e.logprob, 4)) for e in want]
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in lps)
    streamed_lp = [lp for ev in client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8,
                                                        temperature=0, top_logprobs=2, stream=True)
                   if ev.type == "response.output_text.delta" for lp in ev.logprobs]
    assert [e.token for e in streamed_lp] == [e.token for e in lps]

    with client.responses.stream(model=MODEL, input="Say hi.", max_output_tokens=64, temperature=0) as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text

    parsed = client.responses.parse(model=MODEL, input="Invent a person.", text_format=Person,
                                    max_output_tokens=60, temperature=0)
    assert isinstance(parsed.output_parsed, Person)

    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_0")
    assert info.value.body["param"] == "previous_response_id"

    # stored (the default): a next request continues it, as chat would with the whole conversation
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=12, temperature=0)
    assert first.store and client.responses.retrieve(first.id).output_text == first.output_text
    again = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                    instructions="Answer briefly.", max_output_tokens=12, temperature=0)
    whole = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}])
    assert again.previous_response_id == first.id and again.output_text == whole.choices[0].message.content
    assert again.usage.input_tokens == whole.usage.prompt_tokens
    streamed = [ev.response for ev in client.responses.create(model=MODEL, input="Hi.", max_output_tokens=4,
                                                               temperature=0, stream=True)
                if ev.type in ("response.completed", "response.incomplete")][0]
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2, store=False)
    assert not unstored.store
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    assert_pools_idle(url)


def test_function_tools_through_the_responses_api(url) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], tool_choice="required",
                                max_output_tokens=40, temperature=0)
    assert r.status == "completed" and [item.type for item in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments).get("city"), str)
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")

    deltas, final = [], None
    with client.responses.stream(model=MODEL, input=ask, tools=[WEATHER], max_output_tokens=40, temperature=0,
                                 tool_choice={"type": "function", "name": "get_weather"}) as stream:
        for ev in stream:
            if ev.type == "response.function_call_arguments.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    streamed = [item for item in final.output if item.type == "function_call"]
    assert len(streamed) == 1 and "".join(deltas) == streamed[0].arguments == call.arguments

    # the call's result goes back as input items; the answer is the chat completion of that conversation
    follow = client.responses.create(model=MODEL, tools=[WEATHER], max_output_tokens=24, temperature=0, input=[
        *ask, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    chat = client.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, tools=[
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}], messages=[
        *ask, {"role": "assistant", "content": "", "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}])
    msg = chat.choices[0].message
    assert follow.output_text == (msg.content or "")
    assert [i.type for i in follow.output if i.type == "function_call"] == (
        ["function_call"] * len(msg.tool_calls or []))

    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    assert info.value.body["param"] == "tools"
    assert_pools_idle(url)

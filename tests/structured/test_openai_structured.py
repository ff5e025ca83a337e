"""Structured outputs end to end: `pdbox up` (unified and disaggregated), the embedded SmolLM2, the real
`openai` client's ``chat.completions.parse`` with a nested pydantic model, json_object, vLLM's
structured_outputs (and its older guided_regex, guided_choice and guided_json), and bad schemas refused with a
400 naming the field."""

from __future__ import annotations

import json
import re

import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
MAX_TOKENS = 100  # the schema's strings are short: the JSON completes in ~35 tokens


class Country(BaseModel):
    name: str = Field(max_length=12)
    continent: str = Field(max_length=12)


class Capital(BaseModel):
    city: str = Field(max_length=12)
    country: Country


def check_structured(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    parsed = client.chat.completions.parse(model=MODEL, messages=QUESTION, response_format=Capital,
                                           max_tokens=MAX_TOKENS, temperature=0)
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    ans = choice.message.parsed
    assert isinstance(ans, Capital) and isinstance(ans.country, Country), choice.message.content
    assert ans.city == "Paris", ans

    obj = client.chat.completions.create(model=MODEL, messages=QUESTION, response_format={"type": "json_object"},
                                         max_tokens=60, temperature=0)
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)

    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert streamed == obj.choices[0].message.content

    yes_no = client.completions.create(model=MODEL, prompt="Is Paris in France? Answer:", max_tokens=5,
                                       temperature=0.7, seed=1, extra_body={"guided_regex": " ?(yes|no)"})
    assert re.fullmatch(" ?(yes|no)", yes_no.choices[0].text), yes_no.choices[0].text

    options = ["Paris", "Lyon (France)", "Rome|Italy"]  # a choice is literal text, not a regex
    picked = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, seed=3,
                                            n=4, extra_body={"guided_choice": options})
    assert all(c.message.content in options and c.finish_reason == "stop" for c in picked.choices), picked
    current = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                             extra_body={"structured_outputs": {"choice": options}})
    assert current.choices[0].message.content in options  # vLLM's name since 0.12
    guided = client.completions.create(model=MODEL, prompt="The capital of France as JSON:", max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body={"guided_json": Capital.model_json_schema()})
    assert guided.choices[0].finish_reason == "stop"
    assert isinstance(Capital.model_validate_json(guided.choices[0].text), Capital), guided.choices[0].text

    for bad, param in ((dict(response_format={"type": "json_schema", "json_schema": {
                           "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nosuch"}}}}}),
                        "response_format"),
                       (dict(response_format={"type": "xml"}), "response_format"),
                       (dict(extra_body={"guided_regex": "[a-"}), "guided_regex"),
                       (dict(extra_body={"guided_choice": []}), "guided_choice"),
                       (dict(extra_body={"guided_json": {"type": "object"}, "guided_regex": "a"}), "guided_json")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, **bad)
        assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
    assert_pools_idle(url)


@pytest.mark.parametrize("mode", ["unified", "disagg"])
def test_structured_outputs_with_the_openai_client(mode: str) -> None:
    with running_appliance("--mode", mode) as url:
        check_structured(url)

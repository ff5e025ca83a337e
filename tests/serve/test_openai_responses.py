"""/v1/responses end to end: `pdbox up` (disaggregated), the embedded SmolLM2, the real `openai` client's
`responses.create`, its stream, its stream helper and `responses.parse` with a pydantic model. A greedy
response is the chat completion of the same messages; a refused field is a 400 naming it."""

from __future__ import annotations

import openai
import pydantic
import pytest

from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_the_responses_api_with_the_openai_client() -> None:
    with running_appliance() as url:
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
        assert_pools_idle(url)

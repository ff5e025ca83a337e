"""n > 1 end to end: `pdbox up` (unified, disaggregated and adaptive), the embedded SmolLM2, the real `openai` client.
``n=3`` with a seed returns three choices (indexes 0..2), the same three on a second call; streamed,
the same three texts arrive as per-index deltas; the prompt is prefilled once (its cached tokens are
reported once); the pools are idle afterwards (no page leaked by the fork)."""

from __future__ import annotations

import openai
import pytest

from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 6


def check_n(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    kw = dict(model=MODEL, messages=QUESTION, n=3, max_tokens=MAX_TOKENS, temperature=1.0, seed=11)
    first = client.chat.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert all(c.finish_reason in ("stop", "length") for c in first.choices)
    assert len(set(texts)) > 1, texts  # seed + i per sample: not three copies of one draw
    assert first.usage.completion_tokens <= 3 * MAX_TOKENS and first.usage.prompt_tokens > 0
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == texts  # reproducible

    streamed = ["", "", ""]
    finished = set()
    for ch in client.chat.completions.create(**kw, stream=True):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert streamed == texts and finished == {0, 1, 2}

    comp = client.completions.create(model=MODEL, prompt="The sky is", n=2, max_tokens=4, temperature=1.0, seed=5)
    assert [c.index for c in comp.choices] == [0, 1]
    best = client.completions.create(model=MODEL, prompt="The sky is", n=2, best_of=3, max_tokens=4, temperature=1.0,
                                     seed=5)
    assert [c.index for c in best.choices] == [0, 1] and best.usage.completion_tokens <= 12
    assert {c.text for c in best.choices} <= {c.text for c in client.completions.create(
        model=MODEL, prompt="The sky is", n=3, max_tokens=4, temperature=1.0, seed=5).choices}

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=9, max_tokens=2)
    assert info.value.body["param"] == "n"
    assert_pools_idle(url)


@pytest.mark.parametrize("mode", ["unified", "disagg", "auto"])
def test_n_choices_with_the_openai_client(mode: str) -> None:
    with running_appliance("--mode", mode) as url:
        check_n(url)

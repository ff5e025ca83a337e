"""Penalties and logit bias end to end: `pdbox up` (unified, then disaggregated, where prefill samples the
first token and decode the rest), the embedded SmolLM2, the real `openai` client. Both modes give the
same greedy answers under penalties and bias; a +100 bias forces its token from the first on, a -100 bias
bans it while the reported logprobs stay the model's own; `min_tokens` bans a stop token from the first
token (sampled by prefill when disaggregated) until the answer is long enough."""

from __future__ import annotations

import openai
import pytest

from appliance.model.loader import default_model_path
from appliance.model.tokenizer import Tokenizer
from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPT = "The capital of France is"


def answers(url: str, tok: Tokenizer) -> dict[str, object]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def complete(**kw):
        return client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, **kw).choices[0]

    plain = complete(max_tokens=24, logprobs=2)
    first = tok.encode(plain.logprobs.tokens[0])
    assert len(first) == 1 and tok.decode(first) == plain.logprobs.tokens[0]
    banned = complete(max_tokens=4, logprobs=2, logit_bias={str(first[0]): -100})
    ban = {"stop_token_ids": [first[0]]}  # the plain answer's first token, made a stop token
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, extra_body=ban)
    held = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8,
                                     extra_body={**ban, "min_tokens": 4})
    # a stop token ends the answer at once (its text kept, as vLLM keeps a stop token's that is not special)
    assert stopped.choices[0].text == plain.logprobs.tokens[0] and stopped.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens >= 4 and not held.choices[0].text.startswith(plain.logprobs.tokens[0])
    blue = tok.encode(" blue")
    forced = complete(max_tokens=3, logit_bias={str(blue[0]): 100})
    penalised = complete(max_tokens=24, presence_penalty=1.5, frequency_penalty=1.0)
    def chat(**extra) -> str | None:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello twice."}], max_tokens=16, temperature=0,
            extra_body=extra).choices[0].message.content

    out = {"plain": plain, "banned": banned, "held": held.choices[0].text, "forced": forced.text,
           "penalised": penalised.text, "chat": chat(repetition_penalty=1.3), "chat_plain": chat(),
           "blue": tok.decode(blue * 3)}
    assert_pools_idle(url)
    return out


def test_penalties_and_bias_with_the_openai_client_in_both_modes() -> None:
    tok = Tokenizer.from_gguf(default_model_path())
    seen = {}
    for mode in ("unified", "disagg"):
        with running_appliance("--mode", mode) as url:
            seen[mode] = answers(url, tok)
    u, d = seen["unified"], seen["disagg"]
    plain = u["plain"]
    words = plain.logprobs.tokens
    assert len(set(words)) < len(words), "the plain answer repeats itself: the penalties have work to do"
    assert u["penalised"] != plain.text and u["chat"] != u["chat_plain"]
    assert u["forced"] == u["blue"]
    banned = u["banned"]
    assert banned.logprobs.tokens[0] != words[0]
    # the logprobs are the model's own: the banned token is still its likeliest first token
    assert list(banned.logprobs.top_logprobs[0]) == list(plain.logprobs.top_logprobs[0])
    assert banned.logprobs.top_logprobs[0][words[0]] == pytest.approx(plain.logprobs.token_logprobs[0], abs=1e-4)
    for key in ("penalised", "forced", "chat", "held"):
        assert d[key] == u[key], key
    assert d["banned"].text == banned.text and d["plain"].text == plain.text

"""`echo` with `logprobs` on /v1/completions end to end, as lm-eval scores a served model: `pdbox up`
(unified, then disaggregated, where the prefill engine scores the prompt), the embedded SmolLM2, the real
`openai` client. The answer starts with the prompt; its logprobs start with the prompt's tokens (the first
with none); each prompt token's top alternatives are what a request for that prefix alone reports; both
modes agree; a batch of token-id prompts (lm-eval's form) and a stream work the same."""

from __future__ import annotations

import openai
import pytest

from appliance.model.loader import default_model_path
from appliance.model.tokenizer import Tokenizer
from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
# NOTE: the exact floats: in bf16 (the default on a CPU with AVX-512 BF16) a batch's rows and a lone row, or a
# whole prompt and its prefix alone, take GEMM paths that round differently, and a near-tie flips
EXACT = ("--dtype", "float32", "--no-q4-kernels")
PROMPT = "The capital of France is Paris, and the capital of Italy is"


def scored(url: str, ids: list[int]) -> dict[str, object]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def complete(prompt, **kw):
        return client.completions.create(model=MODEL, prompt=prompt, temperature=0, **kw)

    echo = complete(PROMPT, max_tokens=2, logprobs=3, echo=True).choices[0]
    lp = echo.logprobs
    assert echo.text.startswith(PROMPT) and len(lp.tokens) == len(ids) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    for j in (1, len(ids) // 2, len(ids) - 1):  # prompt token j, against a request for ids[:j] alone
        alone = complete(ids[:j], max_tokens=1, logprobs=3).choices[0].logprobs.top_logprobs[0]
        assert list(lp.top_logprobs[j]) == list(alone)
        assert list(lp.top_logprobs[j].values()) == pytest.approx(list(alone.values()), abs=1e-3)
    plain = complete(PROMPT, max_tokens=2, logprobs=3).choices[0]
    assert echo.text == PROMPT + plain.text and lp.token_logprobs[-2:] == pytest.approx(
        plain.logprobs.token_logprobs, abs=1e-3)

    batch = complete([ids, ids[:6], ids[:1]], max_tokens=1, logprobs=1, echo=True)  # lm-eval's loglikelihood form
    assert [len(c.logprobs.token_logprobs) for c in batch.choices] == [len(ids) + 1, 7, 2]
    assert batch.choices[2].logprobs.token_logprobs[0] is None  # a one-token prompt: nothing scores it
    # two prompts prefill in one step: other GEMM shapes, fp32 sums in another order (~1e-3 apart)
    assert batch.choices[0].logprobs.token_logprobs[:-1] == pytest.approx(lp.token_logprobs[:len(ids)], abs=1e-2)

    streamed, scores = "", []
    for ch in complete(PROMPT, max_tokens=2, logprobs=0, echo=True, stream=True):
        for c in ch.choices:
            streamed += c.text
            scores += (c.logprobs.token_logprobs if c.logprobs else [])
    assert streamed == echo.text and len(scores) == len(ids) + 2 and scores[0] is None
    text_only = complete(PROMPT, max_tokens=2, echo=True).choices[0]
    assert text_only.text == echo.text and text_only.logprobs is None
    assert_pools_idle(url)
    return {"echo": echo, "batch": batch}


def test_echo_with_logprobs_scores_the_prompt_in_both_modes() -> None:
    tok = Tokenizer.from_gguf(default_model_path())
    ids = tok.encode_prompt(PROMPT)
    seen = {}
    for mode in ("unified", "disagg"):
        with running_appliance("--mode", mode, *EXACT) as url:
            seen[mode] = scored(url, ids)
    u, d = seen["unified"]["echo"].logprobs, seen["disagg"]["echo"].logprobs
    assert d.tokens == u.tokens
    assert d.token_logprobs[1:] == pytest.approx(u.token_logprobs[1:], abs=1e-3)

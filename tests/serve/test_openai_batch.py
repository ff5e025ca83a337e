"""Several prompts in one /v1/completions request, end to end: `pdbox up` (adaptive, the default), the
embedded SmolLM2, the real `openai` client. Each prompt's choices are what it gets alone (greedy, and
seeded samples with n=2), numbered prompt by prompt; streamed, the same texts under the same indexes;
the ids /tokenize gives answer as their texts do; bad batches are 400s naming `prompt`; no page is left
behind."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.serve.appliance_proc import assert_pools_idle, running_appliance

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
PROMPTS = ["The sky is", "My favourite food is", "Paris is"]
# NOTE: the exact floats: in bf16 (the default on a CPU with AVX-512 BF16) a batch's rows and a lone row, or a
# whole prompt and its prefix alone, take GEMM paths that round differently, and a near-tie flips
EXACT = ("--dtype", "float32", "--no-q4-kernels")


def test_a_batch_of_prompts_answers_each_as_alone() -> None:
    with running_appliance("--mode", "auto", *EXACT) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

        def complete(prompt, **kw):
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, **kw)

        alone = [complete(p, temperature=0) for p in PROMPTS]
        batch = complete(PROMPTS, temperature=0)
        assert [c.index for c in batch.choices] == [0, 1, 2]
        assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
        assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
        assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

        sampled = complete(PROMPTS[:2], temperature=1.0, n=2, seed=7)
        assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
        for k, p in enumerate(PROMPTS[:2]):
            one = complete(p, temperature=1.0, n=2, seed=7)
            assert [c.text for c in sampled.choices[2 * k:2 * k + 2]] == [c.text for c in one.choices]

        streamed = {i: "" for i in range(3)}
        for ch in complete(PROMPTS, temperature=0, stream=True):
            for c in ch.choices:
                streamed[c.index] += c.text
        assert [streamed[i] for i in range(3)] == [c.text for c in batch.choices]

        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())

        tokenized = [post("/tokenize", {"model": MODEL, "prompt": p})["tokens"] for p in PROMPTS]
        assert post("/detokenize", {"model": MODEL, "tokens": tokenized[0]})["prompt"] == PROMPTS[0]
        by_ids = complete(tokenized, temperature=0)  # the server's own ids: the same answers as the texts'
        assert [c.text for c in by_ids.choices] == [c.text for c in batch.choices]
        assert by_ids.usage.prompt_tokens == sum(len(t) for t in tokenized)

        for bad, message in ((["a", [1, 2]], "not both"), (["a"] * 65, "at most 64")):
            with pytest.raises(openai.BadRequestError, match=message) as info:
                complete(bad)
            assert info.value.body["param"] == "prompt"
        assert_pools_idle(url)

"""Whole-engine greedy decoding: the ``triton`` backend equals the ``torch`` backend on a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _greedy(model: str, backend: str, dtype: str, prompts, max_tokens: int):
    from appliance.engine.request import SamplingParams
    from appliance.llm import LLM

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with LLM(model, device="cuda", dtype=dtype, attention_backend=backend, page_size=16,
             max_prefill_tokens=64) as llm:
        assert llm.engine.runner.backend.name == backend
        return [c.token_ids for c in llm.generate(prompts, params)]


def test_tiny_model_fp32(tiny_model):
    system = [5 + (i * 7) % 250 for i in range(40)]
    prompts = [system + [3 + (j * 13 + i) % 250 for j in range(1 + 9 * i)] for i in range(6)]
    want = _greedy(str(tiny_model), "torch", "float32", prompts, 24)
    assert _greedy(str(tiny_model), "triton", "float32", prompts, 24) == want


@pytest.mark.slow
def test_smollm2_bf16_answers_paris(smollm_path):
    from appliance.engine.request import SamplingParams
    from appliance.llm import LLM

    with LLM(str(smollm_path), device="cuda", dtype="bfloat16", attention_backend="triton") as llm:
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(max_tokens=12, temperature=0))
    assert "Paris" in out[0].text

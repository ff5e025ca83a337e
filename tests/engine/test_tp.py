"""Tensor parallelism: two processes over gloo give the same greedy tokens as one."""

from __future__ import annotations

import pytest

from appliance.config import EngineConfig
from appliance.engine.request import SamplingParams
from appliance.llm import LLM


@pytest.mark.parametrize("model_fixture", ["tiny_model", "smollm_path"])
def test_tp2_equals_tp1(model_fixture, request) -> None:
    model = str(request.getfixturevalue(model_fixture))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["The quick brown fox", "In a distant galaxy, long ago", "1, 2, 3,"]
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=256, max_prefill_tokens=8, threads=1)
    with LLM(model, cfg) as one:
        expected = [c.token_ids for c in one.generate(prompts, params)]
    with LLM(model, cfg, tp_size=2) as two:
        got = [c.token_ids for c in two.generate(prompts, params)]
        assert two.engine.runner.model.shard.num_kv_heads < two.engine.model_config.num_kv_heads
    assert got == expected

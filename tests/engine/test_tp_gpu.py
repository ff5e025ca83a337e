"""TP 2 on one GPU (issue 19): the ranks' devices, the step commands and the model's all-reduce, all on
CUDA tensors, with the group over gloo (NCCL refuses two ranks on one GPU; the device check's
`serve-tp2-nccl` step needs two). Greedy tokens equal one rank's on the same GPU and weights."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[5 + (i * 7 + j * 13) % 250 for j in range(3 + 11 * i)] for i in range(4)]  # 3..36 tokens


def test_tp2_over_gloo_on_one_gpu_equals_tp1() -> None:
    from appliance.config import EngineConfig
    from appliance.engine import tp
    from appliance.engine.request import SamplingParams
    from appliance.llm import LLM

    cfg = EngineConfig(device="cuda:0", dtype="float32", attention_backend="triton", page_size=16, num_pages=128,
                       max_prefill_tokens=32, max_running=8, cuda_graphs=False, tp_backend="gloo")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM("random:small", cfg) as one:
        assert one.engine.runner.tp_group is None
        expected = [c.token_ids for c in one.generate(PROMPTS, params)]
    with LLM("random:small", cfg, tp_size=2) as two:
        runner = two.engine.runner
        assert runner.tp_group == tp.TpGroup("gloo", torch.device("cpu"))
        assert runner.device == torch.device("cuda", 0) and runner.pool.kv.device == runner.device
        assert runner.model.shard.num_q_heads == 2  # 4 query heads split; the one KV head on both ranks
        got = [c.token_ids for c in two.generate(PROMPTS, params)]
    assert got == expected

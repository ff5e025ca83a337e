"""What the GPU engine bench's floors count (pure: on CPU): a decode step reads every linear weight and the
LM head, not the embedding table (its batch's rows of it); a prefill runs the LM head on its one sampled row;
the checkpoint's size, which the issue quotes (16 GB for Llama-3-8B), is reported beside."""

from __future__ import annotations

import torch

from appliance.config import EngineConfig
from appliance.engine.runner import ModelRunner
from bench.engine_gpu import _weights


def test_the_floors_count_what_a_step_reads() -> None:
    runner = ModelRunner("random:tiny", EngineConfig(device="cpu", dtype="bfloat16", attention_backend="torch",
                                                     kv_cache_mb=4, max_model_len=256))
    model = runner.model
    layers = sum(w.numel() for lw in model.layers for w in (lw.qkv, lw.o_proj, lw.gate_up, lw.down))
    head, embed = model.lm_head.numel(), model.embed.numel()
    assert model.embed.data_ptr() != model.lm_head.data_ptr()  # random:tiny keeps them apart
    assert _weights(model) == (2 * (layers + head), layers + head, head, 2 * (layers + head + embed))
    model.lm_head = model.embed  # tied: the checkpoint holds the table once
    assert _weights(model)[3] == 2 * (layers + embed)
    assert torch.empty(0, dtype=model.dtype).element_size() == 2

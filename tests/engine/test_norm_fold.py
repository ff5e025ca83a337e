"""A decode step with RMSNorm folded into the GEMV after it (`kernels.rmsnorm_gemv`, where the start-up
timing chose it): on the Triton kernels under the interpreter, the same logits as the step with the norm
as its own kernel, within bf16's rounding, and the same residual stream between the layers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU tensors: the Triton interpreter runs only without CUDA")


def test_a_decode_step_with_the_norms_folded_into_qkv_and_gate_up_matches_the_unfolded_one() -> None:
    import appliance.engine.attention_triton as attention_triton
    from appliance.config import EngineConfig
    from appliance.engine.backends import create_backend
    from appliance.engine.engine import Engine
    from appliance.engine.linear_choice import weight_groups
    from appliance.engine.request import SamplingParams

    engine = Engine("random:tiny", EngineConfig(dtype="bfloat16", page_size=4, num_pages=64,
                                                 attention_backend="torch", max_running=8))
    prompts = [[5 + i % 200 for i in range(30)], [20, 21], [30 + i for i in range(13)]]
    reqs = [engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    while any(len(r.output_ids) < 2 for r in reqs):  # prefill on the references (fast)
        engine.step()
    sb = engine.scheduler.schedule()
    assert sb is not None and sb.decode_only and len(sb.requests) == 3
    runner = engine.runner
    be = create_backend("triton", torch.device("cpu"))
    runner.model.backend = be
    streams: dict[str, list[torch.Tensor]] = {"apart": [], "folded": []}
    real_norm = be.fused_add_rmsnorm

    def norm_spy(*args, **kwargs):
        out = real_norm(*args, **kwargs)
        streams["apart"].append(out[1])
        return out

    be.fused_add_rmsnorm = norm_spy
    apart = runner.forward(runner.build(sb)).clone()
    del be.fused_add_rmsnorm

    real, calls = attention_triton.rmsnorm_gemv, []

    def spy(x, g, eps, w, b=None, residual=None):
        calls.append((tuple(x.shape), tuple(w.shape), residual is not None))
        y, h = real(x, g, eps, w, b, residual)
        if residual is not None:
            streams["folded"].append(h)
        return y, h

    attention_triton.rmsnorm_gemv = spy
    try:
        groups = weight_groups(runner.model)
        be.gemv_norm_for = frozenset((*groups[name][0].shape, 3) for name in ("qkv", "gate_up"))
        folded = runner.forward(runner.build(sb))
    finally:
        attention_triton.rmsnorm_gemv = real
    layers, (n_qkv, k), n_gu = runner.model.cfg.num_layers, groups["qkv"][0].shape, groups["gate_up"][0].shape[0]
    # layer 0's QKV norms the embeddings alone; every other norm adds its block's output first
    assert calls == [((3, k), (n_qkv, k), i > 0) if j == 0 else ((3, k), (n_gu, k), True)
                     for i in range(layers) for j in (0, 1)]
    assert folded.shape == apart.shape
    torch.testing.assert_close(folded.float(), apart.float(), rtol=0.05, atol=0.05)
    assert torch.equal(folded.float().argmax(-1), apart.float().argmax(-1))
    # the residual stream after every block but the last (which the final norm takes), fp32 both ways
    assert len(streams["apart"]) == len(streams["folded"]) == 2 * layers - 1
    for got, want in zip(streams["folded"], streams["apart"], strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    engine.shutdown()

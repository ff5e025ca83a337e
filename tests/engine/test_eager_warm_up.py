"""A CUDA engine without graphs (tensor parallel, mixture-of-experts, graphs off) warms up with throw-away
prompts at start-up: run here on CPU, they leave no pages, cached prefixes, counters or cost-model bias,
and the engine answers as one that never warmed up."""

from __future__ import annotations

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from kernels.decode_attention import num_splits_for


def test_the_eager_warm_up_leaves_nothing_behind(capsys) -> None:
    cfg = EngineConfig(dtype="float32", page_size=4, num_pages=256, attention_backend="torch")
    engine, plain = Engine("random:tiny", cfg), Engine("random:tiny", cfg)
    try:
        free, rate, step_s = engine.pool.num_free, engine.scheduler.prefill_rate, engine.decode_step_s
        engine.warm_up_eager()
        assert "warm-up" in capsys.readouterr().err and engine.warmup_s > 0
        assert engine.pool.num_free == free and not engine.has_unfinished()
        assert (engine.scheduler.prefill_rate, engine.decode_step_s) == (rate, step_s)
        assert engine.stats_prefill_tokens == engine.stats_decode_tokens == 0
        prompt = [5 + i % 50 for i in range(40)]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        a, b = engine.add_request(prompt, params), plain.add_request(prompt, params)
        engine.run_until_done([a])
        plain.run_until_done([b])
        assert a.output_ids == b.output_ids and a.cached_len == 0  # nothing of the warm-up was cached
    finally:
        engine.shutdown()
        plain.shutdown()


def test_the_eager_warm_up_decodes_a_context_long_enough_to_split_and_one_too_short() -> None:
    """Decode attention's two compiles: its split count follows the step's longest context (on a GPU), so
    the long prompt must reach past 256 tokens even when a prefill step takes fewer (it runs in chunks)."""
    cfg = EngineConfig(dtype="float32", page_size=32, num_pages=64, attention_backend="torch",
                       max_prefill_tokens=32)
    engine = Engine("random:tiny", cfg)
    decoded: list[int] = []
    forward = engine.runner.forward

    def spy(batch, *args, **kwargs):
        if batch.decode_only:
            decoded.append(batch.max_seq)
        return forward(batch, *args, **kwargs)

    engine.runner.forward = spy
    try:
        engine.warm_up_eager()
    finally:
        engine.shutdown()
    kv = engine.runner.model.shard.num_kv_heads
    splits = {num_splits_for(1, kv, n, 132) for n in decoded}  # an H100's or H200's 132 multiprocessors
    assert splits == {1, 2}, decoded


"""The engine's one-call decode layers (fp32, quantized weights, ``cpu`` backend): the embedded model
decodes through them, to the same tokens as op by op; models they cannot take run op by op."""

from __future__ import annotations

import pytest

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from kernels.cpu.decode_layer import native

pytestmark = pytest.mark.skipif(native().lib is None, reason=f"no fused fp32 decode layer here: {native().reason}")


def greedy(engine: Engine, prompts: list[str], fused: bool) -> tuple[list[list[int]], int]:
    """Greedy tokens of ``prompts`` decoded together, and how many layers ran as one call."""
    be = engine.runner.backend
    calls = []
    one_call, step = be.decode_layer, be.decode_step
    be.decode_layer = lambda *args: calls.append(1) or one_call(*args)
    be.decode_step = step if fused else (lambda *args: None)  # None: this step runs op by op
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(engine.tokenizer.encode(p), params) for p in prompts]
    try:
        engine.run_until_done(reqs)
    finally:
        be.decode_layer, be.decode_step = one_call, step
    return [r.output_ids for r in reqs], len(calls)


def test_the_embedded_model_decodes_a_call_a_layer_to_the_same_tokens() -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Three colors:"]
    engine = Engine(None, EngineConfig(dtype="float32", threads=2, enable_prefix_cache=False, kv_cache_mb=64))
    try:
        for batch in (prompts[:1], prompts):
            fused, calls = greedy(engine, batch, True)
            by_ops, none = greedy(engine, batch, False)
            assert fused == by_ops
            assert calls == 30 * 11 and none == 0  # SmolLM2's 30 layers, every decode step after the first token
    finally:
        engine.shutdown()


def test_float_weights_run_op_by_op(tiny_model) -> None:
    """The tiny model's weights are plain floats (no quantized blocks): nothing to call as one."""
    engine = Engine(str(tiny_model), EngineConfig(dtype="float32", threads=1, kv_cache_mb=16))
    try:
        tokens, calls = greedy(engine, ["hello world"], True)
        assert calls == 0 and len(tokens[0]) == 12
        assert engine.runner.model.decode_layers(engine.runner.pool.kv) is None
    finally:
        engine.shutdown()

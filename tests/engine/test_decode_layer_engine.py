"""The engine's one-call decode layers (fp32 or bf16, quantized weights, ``cpu`` backend): the embedded model
decodes through them, to the same tokens as op by op; models they cannot take run op by op."""

from __future__ import annotations

import os

import pytest
import torch

from appliance.config import EngineConfig
from appliance.engine.core_share import CoreShare, SharedCores, make_board
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from kernels.cpu.decode_layer import native
from kernels.cpu.team import native as team_native
from tests.engine.test_core_share import on_thread

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


@pytest.mark.skipif(native(torch.bfloat16).lib is None,
                    reason=f"no fused bf16 decode layer here: {native(torch.bfloat16).reason}")
def test_the_embedded_model_in_bf16_decodes_a_call_a_layer_to_the_same_tokens(monkeypatch) -> None:
    """bf16 (the default dtype on CPUs with AVX-512 BF16), up to ``LAYER_MAX_ROWS`` (6) rows a step. Past 4
    rows the op-by-op step runs oneDNN's GEMM where the one call runs the quantized GEMV: compared there
    with an op-by-op step that runs the GEMV too. Seven rows run op by op."""
    import appliance.engine.attention_cpu as attention_cpu

    assert attention_cpu.LAYER_MAX_ROWS[torch.bfloat16] == 6 and attention_cpu.QUANT_MAX_ROWS[torch.bfloat16] == 4
    prompts = ["The capital of France is", "def fibonacci(n):", "Three colors:", "List three fruits:", "Hello",
               "Once upon a time", "2 + 2 ="]
    engine = Engine(None, EngineConfig(dtype="bfloat16", threads=2, enable_prefix_cache=False, kv_cache_mb=64))
    try:
        for batch, steps in ((prompts[:1], 11), (prompts[:4], 11), (prompts[:6], 11), (prompts, 0)):
            fused, calls = greedy(engine, batch, True)
            with monkeypatch.context() as m:
                if steps:  # the op-by-op GEMV bound raised to the batch: the GEMV on both sides
                    m.setitem(attention_cpu.QUANT_MAX_ROWS, torch.bfloat16, max(4, len(batch)))
                by_ops, none = greedy(engine, batch, False)
            assert fused == by_ops
            assert calls == 30 * steps and none == 0  # seven rows: op by op
    finally:
        engine.shutdown()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or team_native().lib is None,
                    reason="needs two cores and the team library")
def test_an_engine_sharing_cores_still_decodes_a_call_a_layer(tmp_path) -> None:
    """Core sharing (auto mode's engines, unified mode's one-core engines) hooks every layer to borrow or give
    back the partner's cores: its decode steps still run a call a layer, with the hook between layers, to
    the same tokens as a two-thread engine. The partner wakes after layer 9 and idles again after layer 19
    of every step, so each step gives the core back and borrows it again mid-step."""
    prompts = ["The capital of France is", "Three colors:"]
    engine = Engine(None, EngineConfig(dtype="float32", threads=2, enable_prefix_cache=False, kv_cache_mb=64))
    board = tmp_path / "cores.board"
    make_board(board, 2)
    home, lent = sorted(os.sched_getaffinity(0))[:2]

    def shared() -> tuple[list[list[int]], int, int, list[int], set[int]]:
        engine.cores = cores = SharedCores(CoreShare(str(board), 0, 1, (home,), (lent,)))
        fits: list[int] = []
        threads: set[int] = set()
        fit = cores.fit

        def partner_wakes_mid_step(layer: int = -1) -> None:
            if layer in (9, 19):
                with open(board, "r+b") as f:
                    f.seek(1)
                    f.write(b"\x01" if layer == 9 else b"\x00")
            fits.append(layer)
            fit(layer)
            threads.add(cores.threads)

        cores.fit = partner_wakes_mid_step  # type: ignore[method-assign]
        try:
            tokens, calls = greedy(engine, prompts, True)
            return tokens, calls, cores.borrows, fits, threads
        finally:
            engine.cores = None
            cores.close()

    try:
        alone, _ = greedy(engine, prompts, True)
        tokens, calls, borrows, fits, threads = on_thread(shared)
        assert tokens == alone
        assert calls == 30 * 11 and threads == {1, 2} and borrows >= 11  # borrowed again in every decode step
        assert fits.count(29) == 12 and fits.count(-1) == 12  # each step: a fit before it and after every layer
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

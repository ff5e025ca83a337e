"""Choosing cuBLAS or pdbox's GEMV per linear layer shape: the weight kinds found in a model, the choice
from timings (a fake timer here; CUDA graphs on a GPU), and the Triton backend's dispatch on it."""

from __future__ import annotations

import pytest
import torch

import appliance.engine.attention_triton as attention_triton
from appliance.config import EngineConfig
from appliance.engine.attention import plain_linear
from appliance.engine.attention_triton import TritonAttentionBackend
from appliance.engine.linear_choice import (
    COLD_MIN_BYTES,
    L2_PASSES,
    MARGIN,
    MAX_LAUNCHES,
    LinearTiming,
    choose_linears,
    cold_pass,
    gemv_shapes,
    norm_rows,
    stand_in,
    summary,
    weight_groups,
)
from appliance.engine.runner import ModelRunner


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner("random:tiny", EngineConfig(device="cpu", dtype="bfloat16", attention_backend="torch",
                                                   kv_cache_mb=4, max_model_len=256))


def test_weight_groups_are_every_layers_dense_weights(runner: ModelRunner) -> None:
    groups = weight_groups(runner.model)
    assert list(groups) == ["qkv", "o_proj", "gate_up", "down", "lm_head"]
    assert [len(ws) for ws in groups.values()] == [2, 2, 2, 2, 1]  # tiny: two layers, one head
    assert groups["qkv"][0].shape == (16 * (4 + 2 * 2), 64) and groups["lm_head"][0].shape == (512, 64)


def test_fp32_weights_stay_on_cublas() -> None:
    fp32 = ModelRunner("random:tiny", EngineConfig(device="cpu", dtype="float32", attention_backend="torch",
                                                   kv_cache_mb=4, max_model_len=256))
    assert weight_groups(fp32.model) == {}


def test_the_gemv_is_kept_only_where_it_beats_cublas_by_the_margin(runner: ModelRunner) -> None:
    groups = weight_groups(runner.model)
    kind = {tuple(ws[0].shape): name for name, ws in groups.items()}
    assert len(kind) == len(groups)  # tiny's kinds have distinct shapes: the fake timer tells them apart
    ran: dict = {}

    def cublas(x, w):
        ran.update(path="cublas", rows=x.shape[0])
        dtypes[kind[tuple(w.shape)]] = x.dtype

    def gemv(x, w):
        ran.update(path="gemv", rows=x.shape[0])
        assert dtypes[kind[tuple(w.shape)]] == x.dtype  # both paths timed on the same rows

    dtypes: dict = {}

    # a fake device: the GEMV's time over cuBLAS's; 20% faster on gate_up at one row, 1% (noise) on down
    speed = {("gate_up", 1): 0.8, ("down", 1): 0.99, ("down", 4): 0.99}

    def timer(fn, weights) -> float:
        fn(weights[0])
        if ran["path"] == "cublas":
            return 10.0
        return 10.0 * speed.get((kind[tuple(weights[0].shape)], ran["rows"]), 1.2)

    timings = choose_linears(runner.model, [1, 4], cublas, gemv, timer=timer)
    assert [(t.name, t.rows) for t in timings] == [(name, m) for name in groups for m in (1, 4)]
    assert {(t.name, t.rows) for t in timings if t.gemv_wins} == {("gate_up", 1)}  # down's 1% is inside MARGIN
    assert 0.99 > MARGIN
    n, k = groups["gate_up"][0].shape
    assert gemv_shapes(timings) == frozenset({(n, k, 1)})
    assert summary(timings) == "qkv cuBLAS; o_proj cuBLAS; gate_up GEMV at rows 1: 0.80x; down cuBLAS; lm_head cuBLAS"
    # the LM head is timed on the final norm's fp32 rows, as a step feeds it; the layers on the weights' dtype
    assert dtypes == {"qkv": torch.bfloat16, "o_proj": torch.bfloat16, "gate_up": torch.bfloat16,
                      "down": torch.bfloat16, "lm_head": torch.float32}


def test_a_row_count_between_buckets_follows_the_one_it_shares_a_compile_with() -> None:
    ladder = (1, 2, 4, 8, 16, 32, 64)
    assert [stand_in(m, ladder) for m in (1, 2, 3, 5, 9, 12, 15, 16, 17, 24, 33, 40, 48, 63, 64)] == [
        1, 2, 4, 8, 8, 8, 8, 16, None, None, None, None, 64, None, 64]
    # 17 to 31 rows take the 32-row tile, as 32 does, but 32 is a multiple of 16 and they are not: no stand-in;
    # 1 is compiled apart (Triton's constant) and stands in for no other count
    assert stand_in(3, (1, 8)) == 8 and stand_in(3, (1,)) is None and stand_in(24, (1, 2, 20)) == 20
    assert stand_in(7, (2, 4)) == 4  # no timed count above in its class: the nearest below


def test_the_triton_backend_dispatches_on_the_chosen_shapes(monkeypatch) -> None:
    used: list[tuple] = []
    monkeypatch.setattr(attention_triton, "gemv", lambda x, w, b=None: used.append((tuple(x.shape), tuple(w.shape)))
                        or plain_linear(x, w, b))
    be = TritonAttentionBackend()
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    assert torch.equal(be.linear(x, w), plain_linear(x, w)) and used == []  # nothing chosen: cuBLAS
    be.gemv_for = frozenset({(6, 8, 2)})
    be.linear(x, w)
    be.linear(torch.randn(3, 8), w)  # 3 rows were not chosen
    be.linear(torch.randn(8, 2).t(), w)  # rows that are not unit-stride: cuBLAS takes any layout
    assert used == [((2, 8), (6, 8))]


def test_eager_row_counts_dispatch_on_their_stand_in(monkeypatch) -> None:
    used: list[int] = []
    monkeypatch.setattr(attention_triton, "gemv", lambda x, w, b=None: used.append(x.shape[0]) or plain_linear(x, w, b))
    be, w = TritonAttentionBackend(), torch.randn(6, 8)
    be.gemv_for = frozenset({(6, 8, 4), (6, 8, 8)})  # the GEMV won at 4 and 8 rows, lost at 1, 2, 16, 32, 64
    be.gemv_rows = (1, 2, 4, 8, 16, 32, 64)
    assert be.gemv_rows == (1, 2, 4, 8, 16, 32, 64)
    for m in (1, 3, 5, 12, 16, 24, 40, 48):
        be.linear(torch.randn(m, 8), w)
    assert used == [3, 5, 12]  # 3 follows 4; 5 and 12 follow 8; 16 and 48 (64) lost; 1, 24, 40 have none
    be.gemv_for |= {(6, 8, 64)}
    used.clear()
    for m in (40, 48, 63):
        be.linear(torch.randn(m, 8), w)
    assert used == [48]


def test_a_timed_pass_reads_past_the_l2() -> None:
    l2, mb = 50 << 20, COLD_MIN_BYTES
    tiny = [torch.empty(1024, dtype=torch.bfloat16) for _ in range(4)]  # 2 KB each: launch-bound, never repeated
    assert cold_pass(tiny, l2) == tiny
    mid = [torch.empty(mb, dtype=torch.bfloat16) for _ in range(3)]  # 6 MB: repeated past L2_PASSES x L2
    reps = len(cold_pass(mid, l2)) // 3
    assert reps * 6 * mb >= L2_PASSES * l2 > (reps - 1) * 6 * mb
    many = [torch.empty(mb // 2, dtype=torch.bfloat16) for _ in range(40)]  # 40 MB in 40 weights: capped
    assert cold_pass(many, l2) == many * (MAX_LAUNCHES // 40)
    big = [torch.empty(L2_PASSES * l2 // 2, dtype=torch.bfloat16)]  # one weight past it: once
    assert cold_pass(big, l2) == big


def test_a_failed_timing_leaves_every_layer_on_cublas(runner: ModelRunner, monkeypatch, capsys) -> None:
    import appliance.engine.runner as runner_mod

    def boom(*_a, **_k):
        raise RuntimeError("no GEMV here")

    monkeypatch.setattr(runner_mod, "choose_linears", boom)
    be = TritonAttentionBackend()
    monkeypatch.setattr(runner, "backend", be)
    runner.choose_linears([1, 2])
    assert be.gemv_for == frozenset() and "GEMV timing failed" in capsys.readouterr().err


def test_timings_report_their_ratio() -> None:
    t = LinearTiming("o_proj", 4096, 4096, 1, cublas_us=10.0, gemv_us=9.6)
    assert t.gemv_wins and not LinearTiming("o_proj", 4096, 4096, 1, 10.0, 9.8).gemv_wins


def test_swiglu_down_is_timed_with_its_activation_and_dispatched_apart(runner: ModelRunner) -> None:
    """``down`` on a SwiGLU model: cuBLAS's side runs SiLU-and-mul first, the GEMV's reads the gate/up
    rows (2K wide) itself; a win lands in its own set, never in the plain ``linear`` one."""
    groups = weight_groups(runner.model)
    n, k = groups["down"][0].shape
    seen: list[tuple] = []

    def cublas(x, w):
        seen.append(("cublas", tuple(x.shape)))

    def gemv(x, w, silu_mul=False):
        seen.append(("gemv", tuple(x.shape), silu_mul))

    def act(x):
        seen.append(("act", tuple(x.shape)))
        return x[:, : x.shape[1] // 2]

    def timer(fn, weights) -> float:
        seen.clear()
        fn(weights[0])
        return 5.0 if seen[-1][0] == "gemv" and weights[0].shape == (n, k) else 10.0

    timings = choose_linears(runner.model, [1], cublas, gemv, timer=timer, silu_and_mul=act)
    down = next(t for t in timings if t.name == "down")
    assert down.silu_mul and down.gemv_wins and not any(t.silu_mul for t in timings if t.name != "down")
    assert gemv_shapes(timings) == frozenset() and gemv_shapes(timings, silu_mul=True) == frozenset({(n, k, 1)})
    assert "down (with SiLU) GEMV at rows 1: 0.50x" in summary(timings)
    calls: dict[tuple, list] = {}

    def record(fn, weights) -> float:
        seen.clear()
        fn(weights[0])
        calls.setdefault(tuple(weights[0].shape), []).append(list(seen))
        return 1.0

    choose_linears(runner.model, [2], cublas, gemv, timer=record, silu_and_mul=act)
    assert calls[(n, k)] == [[("act", (2, 2 * k)), ("cublas", (2, k))], [("gemv", (2, 2 * k), True)]]
    qkv = tuple(groups["qkv"][0].shape)
    assert calls[qkv] == [[("cublas", (2, qkv[1]))], [("gemv", (2, qkv[1]), False)]]


def test_the_triton_backend_fuses_down_only_where_chosen(monkeypatch) -> None:
    from kernels.activation import silu_and_mul_ref

    used: list[tuple] = []
    monkeypatch.setattr(attention_triton, "gemv", lambda x, w, b=None, silu_mul=False: used.append(
        (tuple(x.shape), silu_mul)) or plain_linear(silu_and_mul_ref(x) if silu_mul else x, w, b))
    monkeypatch.setattr(attention_triton, "silu_and_mul", silu_and_mul_ref)
    be = TritonAttentionBackend()
    x, w = torch.randn(2, 16), torch.randn(6, 8)
    want = plain_linear(silu_and_mul_ref(x), w)
    assert torch.equal(be.silu_mul_linear(x, w), want) and used == []  # nothing chosen: the activation, cuBLAS
    be.gemv_for = frozenset({(6, 8, 2)})  # the plain GEMV chosen for this shape: after the activation kernel
    torch.testing.assert_close(be.silu_mul_linear(x, w), want)
    be.gemv_silu_mul_for = frozenset({(6, 8, 2)})
    torch.testing.assert_close(be.silu_mul_linear(x, w), want)
    assert used == [((2, 8), False), ((2, 16), True)]


def test_qkv_and_gate_up_are_timed_with_their_norm_against_the_layer_as_dispatched(runner: ModelRunner) -> None:
    """``norm`` rows: the residual-add RMSNorm kernel (bf16 rows from an fp32 stream), then the layer as the
    plain row chose it (the GEMV where it won), against the one kernel that does both; a win lands in its
    own set."""
    groups = weight_groups(runner.model)
    qkv, gate_up = tuple(groups["qkv"][0].shape), tuple(groups["gate_up"][0].shape)
    seen: list[tuple] = []

    def cublas(x, w, b=None):
        seen.append(("cublas", tuple(x.shape), x.dtype))

    def gemv(x, w, b=None, silu_mul=False):
        seen.append(("gemv", tuple(x.shape), x.dtype))

    def add_rmsnorm(x, r, g, eps, out_dtype):
        seen.append(("norm", tuple(x.shape), r.dtype, tuple(g.shape), eps, out_dtype))
        return x.to(out_dtype), x + r

    warmed: list[tuple] = []

    def rmsnorm_gemv(x, g, eps, w, b=None, residual=None):
        if residual is None:  # layer 0's form, run once untimed
            warmed.append((tuple(x.shape), x.dtype, tuple(w.shape)))
            return
        seen.append(("fused", tuple(x.shape), residual.dtype, tuple(g.shape)))

    calls: list[tuple] = []

    def timer(fn, weights) -> float:
        seen.clear()
        fn(weights[0])
        calls.append((tuple(weights[0].shape), list(seen)))
        if seen[-1][0] == "fused":
            return 4.0 if weights[0].shape == gate_up else 9.9
        if seen[-1][0] == "gemv":  # the plain GEMV wins on QKV only
            return 5.0 if weights[0].shape == qkv else 20.0
        return 10.0

    timings = choose_linears(runner.model, [2], cublas, gemv, timer=timer)
    assert not any(t.norm for t in timings)
    timings += norm_rows(runner.model, timings, cublas, gemv, add_rmsnorm, rmsnorm_gemv, timer=timer)
    normed = [t for t in timings if t.norm]
    assert [(t.name, t.rows) for t in normed] == [("qkv", 2), ("gate_up", 2)]
    k, eps = qkv[1], runner.model.cfg.rms_eps
    norm = ("norm", (2, k), torch.float32, (k,), eps, torch.bfloat16)
    assert calls[-4:] == [(qkv, [norm, ("gemv", (2, k), torch.bfloat16)]),  # QKV's plain row chose the GEMV
                          (qkv, [("fused", (2, k), torch.float32, (k,))]),
                          (gate_up, [norm, ("cublas", (2, k), torch.bfloat16)]),
                          (gate_up, [("fused", (2, k), torch.float32, (k,))])]
    assert warmed == [((2, k), torch.float32, qkv)]  # the fp32 embeddings, no residual: compiled at start-up too
    assert [(t.cublas_us, t.gemv_us, t.gemv_wins) for t in normed] == [(5.0, 9.9, False), (10.0, 4.0, True)]
    assert gemv_shapes(timings, norm=True) == frozenset({(*gate_up, 2)})
    assert gemv_shapes(timings) == frozenset({(*qkv, 2)})  # the plain set keeps its own
    assert summary(timings).endswith("qkv (with RMSNorm) cuBLAS; gate_up (with RMSNorm) GEMV at rows 2: 0.40x")


def test_float16_weights_keep_their_norm() -> None:
    fp16 = ModelRunner("random:tiny", EngineConfig(device="cpu", dtype="float16", attention_backend="torch",
                                                   kv_cache_mb=4, max_model_len=256))
    timings = choose_linears(fp16.model, [1], lambda x, w: None, lambda x, w: None, timer=lambda fn, ws: 1.0)
    assert timings and norm_rows(fp16.model, timings, lambda *a: None, lambda *a: None, lambda *a: (a[0], a[0]),
                                 lambda *a, **k: None, timer=lambda fn, ws: 1.0) == []


def test_the_triton_backend_folds_the_norm_only_where_chosen(monkeypatch) -> None:
    from appliance.engine.attention import TorchAttentionBackend

    used: list[tuple] = []

    def fake(x, g, eps, w, b=None, residual=None):
        used.append((tuple(x.shape), residual is not None))
        return TorchAttentionBackend().norm_linear(x, residual, g, eps, w, b)

    monkeypatch.setattr(attention_triton, "rmsnorm_gemv", fake)
    be, ref = TritonAttentionBackend(), TorchAttentionBackend()
    x, r, g, w = torch.randn(2, 8), torch.randn(2, 8), torch.rand(8) + 0.5, torch.randn(6, 8)
    monkeypatch.setattr(be, "fused_add_rmsnorm", ref.fused_add_rmsnorm)  # the unfused path, on the references
    monkeypatch.setattr(be, "rmsnorm", ref.rmsnorm)
    want_y, want_h = ref.norm_linear(x, r, g, 1e-6, w)
    got_y, got_h = be.norm_linear(x, r, g, 1e-6, w)
    assert torch.equal(got_y, want_y) and torch.equal(got_h, want_h) and used == []  # nothing chosen: two calls
    be.gemv_norm_for = frozenset({(6, 8, 2)})
    be.norm_linear(x, r, g, 1e-6, w)
    y, h = be.norm_linear(x, None, g, 1e-6, w)  # the first layer: no residual yet, x is the stream
    assert h is x and torch.equal(y, plain_linear(ref.rmsnorm(x, g, 1e-6), w))
    be.norm_linear(torch.randn(3, 8), torch.randn(3, 8), g, 1e-6, w)  # 3 rows were not chosen
    be.norm_linear(x, r, g, 1e-6, w.half())  # float16 weights keep the norm apart
    assert used == [((2, 8), True), ((2, 8), False)]


def test_qkv_bias_goes_into_both_sides_of_its_norm_timing(runner: ModelRunner, monkeypatch) -> None:
    n = weight_groups(runner.model)["qkv"][0].shape[0]
    bias = torch.zeros(n, dtype=torch.bfloat16)
    monkeypatch.setattr(runner.model.layers[0], "qkv_bias", bias)  # a Qwen2-style layer
    got: list[tuple] = []
    plain = [LinearTiming(name, *runner.model.layers[0].__dict__[name].shape, 1, 10.0, 20.0)
             for name in ("qkv", "gate_up")]
    norm_rows(runner.model, plain, lambda x, w, b=None: got.append(("cublas", b is bias)), None,
              lambda x, r, g, eps, dt: (x, x + r),
              lambda x, g, eps, w, b=None, residual=None: got.append(("fused", b is bias, residual is None)),
              timer=lambda fn, ws: fn(ws[0]) or 1.0)
    assert got == [("cublas", True), ("fused", True, False), ("fused", True, True),  # QKV: timed, then layer 0's
                   ("cublas", False), ("fused", False, False)]  # gate/up has no bias


def test_a_failed_norm_timing_keeps_the_plain_choices(runner: ModelRunner, monkeypatch, capsys) -> None:
    import appliance.engine.runner as runner_mod

    won = [LinearTiming("o_proj", 6, 8, 1, cublas_us=10.0, gemv_us=5.0)]
    monkeypatch.setattr(runner_mod, "choose_linears", lambda *a, **k: list(won))

    def boom(*_a, **_k):
        raise RuntimeError("the NORM variant does not compile here")

    monkeypatch.setattr(runner_mod, "norm_rows", boom)
    be = TritonAttentionBackend()
    monkeypatch.setattr(runner, "backend", be)
    runner.choose_linears([1])
    assert be.gemv_for == frozenset({(6, 8, 1)}) and be.gemv_norm_for == frozenset()
    assert runner.linear_timings == won
    assert "RMSNorm-folded GEMV timing failed, every norm a kernel of its own" in capsys.readouterr().err

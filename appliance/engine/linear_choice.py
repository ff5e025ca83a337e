"""Which linear layers a small decode step runs on pdbox's GEMV (`kernels.gemv`) instead of cuBLAS:
measured on the device at start-up, per weight shape and row count, never assumed.

At one to 64 rows (decode's buckets) a linear layer is mostly a stream of its weight; which kernel
streams it faster depends on the shape, the row count and the GPU. Each candidate runs every layer's
weight of one kind in turn, repeated past the L2's size (so the weights come from HBM, as in a decode
step), inside a CUDA graph (so the timing is the GPU's, not Python's launch rate), and the GEMV is kept
only where it beats cuBLAS by ``MARGIN``; a row count between the timed ones follows its `stand_in`.
The SwiGLU MLP's down projection is timed as what a step runs there: SiLU-and-mul then cuBLAS, against
the GEMV that reads the gate/up rows itself (``silu_mul``). The layers after a block's RMSNorm (QKV,
gate/up) are timed the same way (``norm``): the residual-add RMSNorm kernel then the layer as otherwise
dispatched, against the GEMV that adds and norms the rows itself (`kernels.rmsnorm_gemv`; bf16 weights
only).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels.gemv import compile_class

MARGIN = 0.97  # the GEMV must take at most this share of cuBLAS's time: noise never flips a choice
REPS = 7
L2_PASSES = 2  # a timed pass reads at least this many times the L2's bytes: every weight comes from HBM
MAX_LAUNCHES = 128  # ... in at most this many calls
COLD_MIN_BYTES = 1 << 20  # weights under this (on average) are not repeated: a launch costs more than their read
DEFAULT_L2_BYTES = 64 << 20  # where the device does not say (an H100's is 50 MB, an H200's 60 MB)


@dataclass(frozen=True)
class LinearTiming:
    """One weight kind at one row count: microseconds per weight on each path. ``silu_mul``: the
    timings include the activation before the layer (cuBLAS's as its own kernel, the GEMV's fused).
    ``norm``: they include the residual add and RMSNorm before it; ``cublas_us`` is then the norm's
    kernel followed by the layer as the plain row dispatches it (cuBLAS, or the GEMV where that won)."""

    name: str
    n: int
    k: int
    rows: int
    cublas_us: float
    gemv_us: float
    silu_mul: bool = False
    norm: bool = False

    @property
    def label(self) -> str:
        return self.name + (" (with SiLU)" if self.silu_mul else " (with RMSNorm)" if self.norm else "")

    @property
    def gemv_wins(self) -> bool:
        return self.gemv_us <= MARGIN * self.cublas_us


Timer = Callable[[Callable[[torch.Tensor], object], Sequence[torch.Tensor]], float]


def weight_groups(model) -> dict[str, list[torch.Tensor]]:
    """The model's dense 16-bit linear weights by kind, every layer's (plain tensors only: no packed form).
    fp32 stays on cuBLAS: it is the dtype of the exact-token tests, not of serving."""
    groups = {name: [getattr(lw, name) for lw in model.layers] for name in ("qkv", "o_proj", "gate_up", "down")}
    groups["lm_head"] = [model.lm_head]
    return {name: ws for name, ws in groups.items()
            if ws and all(isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape == ws[0].shape
                          and w.dtype in (torch.bfloat16, torch.float16) for w in ws)}


def cold_pass(weights: Sequence[torch.Tensor], l2_bytes: int) -> list[torch.Tensor]:
    """``weights`` repeated until one pass over them reads ``L2_PASSES`` times ``l2_bytes`` (at most
    ``MAX_LAUNCHES`` calls): between two reads of a weight the rest of the pass evicts it from L2, as the
    rest of the model does in a decode step. A small model's layers of one kind fit in L2 all together
    (Qwen2.5-0.5B's QKV: 50 MB), and timed over them alone both paths would read L2, not HBM."""
    size = sum(w.numel() * w.element_size() for w in weights)
    if size < COLD_MIN_BYTES * len(weights):
        return list(weights)
    reps = -(-L2_PASSES * l2_bytes // max(size, 1))
    return list(weights) * max(1, min(reps, MAX_LAUNCHES // max(len(weights), 1)))


def graph_timer(fn: Callable[[torch.Tensor], object], weights: Sequence[torch.Tensor]) -> float:
    """Median microseconds per weight of ``fn`` over ``weights`` (a `cold_pass` of them), replayed from a
    CUDA graph."""
    props = torch.cuda.get_device_properties(weights[0].device)
    weights = cold_pass(weights, getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)

    def every() -> None:
        for w in weights:
            fn(w)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and autotuning happen here, outside the capture
        every()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # as the decode graphs: another
        every()                                                         # thread's CUDA call cannot void it
    graph.replay()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(weights))
    return statistics.median(times)


def choose_linears(model, rows: Sequence[int], cublas: Callable, gemv: Callable, timer: Timer = graph_timer,
                   silu_and_mul: Callable | None = None) -> list[LinearTiming]:
    """Time ``cublas(x, w)`` against ``gemv(x, w)`` for every weight kind of ``model`` at each row count.
    ``silu_and_mul`` (a SwiGLU model): ``down`` is timed as ``cublas(silu_and_mul(x), w)`` against
    ``gemv(x, w, silu_mul=True)`` on gate/up rows ``x``."""
    out = []
    for name, weights in weight_groups(model).items():
        n, k = weights[0].shape
        fused = name == "down" and silu_and_mul is not None
        rows_dtype = torch.float32 if name == "lm_head" else weights[0].dtype  # the final norm's rows are fp32
        for m in rows:
            x = torch.randn(m, 2 * k if fused else k, dtype=rows_dtype, device=weights[0].device)
            if fused:
                t_cublas = timer(lambda w, x=x: cublas(silu_and_mul(x), w), weights)
                t_gemv = timer(lambda w, x=x: gemv(x, w, silu_mul=True), weights)
            else:
                t_cublas = timer(lambda w, x=x: cublas(x, w), weights)
                t_gemv = timer(lambda w, x=x: gemv(x, w), weights)
            out.append(LinearTiming(name, n, k, m, round(t_cublas, 2), round(t_gemv, 2), fused))
    return out


NORMED = {"qkv": "input_norm", "gate_up": "post_norm"}  # weight kind: the norm before it (LayerWeights)


def norm_rows(model, plain: Sequence[LinearTiming], cublas: Callable, gemv: Callable, add_rmsnorm: Callable,
              rmsnorm_gemv: Callable, timer: Timer = graph_timer) -> list[LinearTiming]:
    """For each bf16 weight kind after a norm (`choose_linears`' ``plain`` timings say which and at which row
    counts), the residual-add RMSNorm kernel (bf16 rows out of an fp32 stream, as a step runs it; the
    kernels of `kernels.norm.fused_add_rmsnorm`), then the layer as dispatched, against ``rmsnorm_gemv``
    (`kernels.rmsnorm_gemv`), which does all three. QKV's bias, where the model has one, goes in both; the
    first layer's form (the fp32 embeddings, no residual) runs once too, untimed, so that it compiles here
    and not in the middle of the decode graphs' capture."""
    out = []
    groups, eps = weight_groups(model), model.cfg.rms_eps
    for name, attr in NORMED.items():
        weights = groups.get(name)
        if not weights or weights[0].dtype != torch.bfloat16:  # float16 keeps its norm (`kernels.rmsnorm_gemv`)
            continue
        g = getattr(model.layers[0], attr)
        bias = getattr(model.layers[0], "qkv_bias", None) if name == "qkv" else None
        n, k = weights[0].shape
        for t in plain:
            if t.name != name or t.silu_mul or t.norm:
                continue
            linear = gemv if t.gemv_wins else cublas
            x = torch.randn(t.rows, k, dtype=weights[0].dtype, device=weights[0].device)
            r = torch.randn(t.rows, k, dtype=torch.float32, device=weights[0].device)
            t_pair = timer(lambda w, x=x, r=r, g=g, b=bias, linear=linear:
                           linear(add_rmsnorm(x, r, g, eps, w.dtype)[0], w, b), weights)
            t_fused = timer(lambda w, x=x, r=r, g=g, b=bias: rmsnorm_gemv(x, g, eps, w, b, residual=r), weights)
            if name == "qkv":  # layer 0: the embeddings normed alone
                rmsnorm_gemv(x.float(), g, eps, weights[0], bias)
            out.append(LinearTiming(name, n, k, t.rows, round(t_pair, 2), round(t_fused, 2), norm=True))
    return out


def stand_in(m: int, rows: Sequence[int]) -> int | None:
    """The timed row count whose choice an ``m``-row call follows: ``m`` itself where timed, else the
    nearest timed count above it (failing that, below) of the same `kernels.gemv.compile_class`, whose
    compiled and tuned GEMV it runs (an eager step of 5 rows follows the bucket of 8). None where no timed
    count shares its class: such a call stays on cuBLAS, since its GEMV would compile while serving."""
    if m in rows:
        return m
    same = [r for r in rows if compile_class(r) == compile_class(m)]
    above = [r for r in same if r > m]
    return min(above) if above else max(same) if same else None


def gemv_shapes(timings: Sequence[LinearTiming], silu_mul: bool = False,
                norm: bool = False) -> frozenset[tuple[int, int, int]]:
    """``(n, k, rows)`` where the GEMV won: what the backend's ``linear`` dispatches on, with ``silu_mul``
    its ``silu_mul_linear``, with ``norm`` its ``norm_linear``."""
    return frozenset((t.n, t.k, t.rows) for t in timings
                     if t.gemv_wins and t.silu_mul == silu_mul and t.norm == norm)


def summary(timings: Sequence[LinearTiming]) -> str:
    """One line: per weight kind, the rows where the GEMV won and its time against cuBLAS's."""
    parts = []
    for label in dict.fromkeys(t.label for t in timings):
        won = [t for t in timings if t.label == label and t.gemv_wins]
        ratio = ", ".join(f"{t.rows}: {t.gemv_us / t.cublas_us:.2f}x" for t in won)
        parts.append(f"{label} {'GEMV at rows ' + ratio if won else 'cuBLAS'}")
    return "; ".join(parts)

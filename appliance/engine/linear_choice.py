"""Which linear layers a small decode step runs on pdbox's GEMV (`kernels.gemv`) instead of cuBLAS:
measured on the device at start-up, per weight shape and row count, never assumed.

At one to sixteen rows a linear layer is a stream of its weight; which kernel streams it faster
depends on the shape and the GPU. Each candidate runs every layer's weight of one kind in turn (so the
weights come from HBM, not L2, as in a decode step) inside a CUDA graph (so the timing is the GPU's,
not Python's launch rate), and the GEMV is kept only where it beats cuBLAS by ``MARGIN``. The SwiGLU
MLP's down projection is timed as what a step runs there: SiLU-and-mul then cuBLAS, against the GEMV
that reads the gate/up rows itself (``silu_mul``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MARGIN = 0.97  # the GEMV must take at most this share of cuBLAS's time: noise never flips a choice
REPS = 7


@dataclass(frozen=True)
class LinearTiming:
    """One weight kind at one row count: microseconds per weight on each path. ``silu_mul``: the
    timings include the activation before the layer (cuBLAS's as its own kernel, the GEMV's fused)."""

    name: str
    n: int
    k: int
    rows: int
    cublas_us: float
    gemv_us: float
    silu_mul: bool = False

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


def graph_timer(fn: Callable[[torch.Tensor], object], weights: Sequence[torch.Tensor]) -> float:
    """Median microseconds per weight of ``fn`` over ``weights``, replayed from a CUDA graph."""
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
        for m in rows:
            x = torch.randn(m, 2 * k if fused else k, dtype=weights[0].dtype, device=weights[0].device)
            if fused:
                t_cublas = timer(lambda w, x=x: cublas(silu_and_mul(x), w), weights)
                t_gemv = timer(lambda w, x=x: gemv(x, w, silu_mul=True), weights)
            else:
                t_cublas = timer(lambda w, x=x: cublas(x, w), weights)
                t_gemv = timer(lambda w, x=x: gemv(x, w), weights)
            out.append(LinearTiming(name, n, k, m, round(t_cublas, 2), round(t_gemv, 2), fused))
    return out


def gemv_shapes(timings: Sequence[LinearTiming], silu_mul: bool = False) -> frozenset[tuple[int, int, int]]:
    """``(n, k, rows)`` where the GEMV won: what the backend's ``linear`` dispatches on, or with
    ``silu_mul`` its ``silu_mul_linear``."""
    return frozenset((t.n, t.k, t.rows) for t in timings if t.gemv_wins and t.silu_mul == silu_mul)


def summary(timings: Sequence[LinearTiming]) -> str:
    """One line: per weight kind, the rows where the GEMV won and its time against cuBLAS's."""
    parts = []
    for name in dict.fromkeys(t.name for t in timings):
        mine = [t for t in timings if t.name == name]
        won = [t for t in mine if t.gemv_wins]
        ratio = ", ".join(f"{t.rows}: {t.gemv_us / t.cublas_us:.2f}x" for t in won)
        label = f"{name} (with SiLU)" if any(t.silu_mul for t in mine) else name
        parts.append(f"{label} {'GEMV at rows ' + ratio if won else 'cuBLAS'}")
    return "; ".join(parts)

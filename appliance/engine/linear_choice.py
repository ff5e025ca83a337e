"""Which linear layers a small decode step runs on pdbox's GEMV (`kernels.gemv`) instead of cuBLAS:
measured on the device at start-up, per weight shape and row count, never assumed.

At one to sixteen rows a linear layer is a stream of its weight; which kernel streams it faster
depends on the shape and the GPU. Each candidate runs every layer's weight of one kind in turn (so the
weights come from HBM, not L2, as in a decode step) inside a CUDA graph (so the timing is the GPU's,
not Python's launch rate), and the GEMV is kept only where it beats cuBLAS by ``MARGIN``.
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
    """One weight kind at one row count: microseconds per weight on each path."""

    name: str
    n: int
    k: int
    rows: int
    cublas_us: float
    gemv_us: float

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
    with torch.cuda.graph(graph):
        every()
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


def choose_linears(model, rows: Sequence[int], cublas: Callable, gemv: Callable,
                   timer: Timer = graph_timer) -> list[LinearTiming]:
    """Time ``cublas(x, w)`` against ``gemv(x, w)`` for every weight kind of ``model`` at each row count."""
    out = []
    for name, weights in weight_groups(model).items():
        n, k = weights[0].shape
        for m in rows:
            x = torch.randn(m, k, dtype=weights[0].dtype, device=weights[0].device)
            t_cublas = timer(lambda w, x=x: cublas(x, w), weights)
            t_gemv = timer(lambda w, x=x: gemv(x, w), weights)
            out.append(LinearTiming(name, n, k, m, round(t_cublas, 2), round(t_gemv, 2)))
    return out


def gemv_shapes(timings: Sequence[LinearTiming]) -> frozenset[tuple[int, int, int]]:
    """``(n, k, rows)`` where the GEMV won: what the backend's ``linear`` dispatches on."""
    return frozenset((t.n, t.k, t.rows) for t in timings if t.gemv_wins)


def summary(timings: Sequence[LinearTiming]) -> str:
    """One line: per weight kind, the rows where the GEMV won and its time against cuBLAS's."""
    parts = []
    for name in dict.fromkeys(t.name for t in timings):
        won = [t for t in timings if t.name == name and t.gemv_wins]
        ratio = ", ".join(f"{t.rows}: {t.gemv_us / t.cublas_us:.2f}x" for t in won)
        parts.append(f"{name} {'GEMV at rows ' + ratio if won else 'cuBLAS'}")
    return "; ".join(parts)

"""KV transfer bench: GB/s of a prefill -> decode page handoff between two real processes, against
a single-process copy of the same page runs (the baseline).

    python -m bench.transfer --backend shm --pages 64 --json      # one JSON object on stdout
    python -m bench.transfer                                      # rich table: shm, tcp x 1 / 64 / 512 pages
    python -m bench.transfer --backend cuda_ipc --json            # on a GPU (also: nvshmem)

One measurement: this process is the prefill rank; a spawned process is the decode rank, which
allocates its pool through the transport and waits on the room. Time runs from just before the
first `write` to the moment the decode process sees the room DONE (both read CLOCK_MONOTONIC), so
it covers every layer's K and V plus the completion signal. The baseline copies the same page runs
with the same ``copy_`` calls inside one process (device-synchronized on a GPU). Baseline and
transport runs alternate so that both see the same machine load; each figure is the median of
``--repeats`` runs after one warm-up. Shapes default to SmolLM2-135M (30 layers, 3 KV heads,
head_dim 64, page_size 16). Every GB/s here is the KV bytes moved, once (the d2d copy's too, so the
ratios hold); `bench.kernels` and `bench.engine` count a copy's read and write, twice these.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import click
import torch

import nvshmem_kv as nk
from appliance.cli_support import HELP_OPTIONS, run_command
from nvshmem_kv.pages import PageRun, coalesce_runs

SIZES = {1: "1 page", 64: "64 pages", 512: "8K-token prompt (512 pages)", 2048: "32K-token prompt (2048 pages)"}
DEFAULT_PAGES = (1, 64, 512)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GPU_BACKENDS = ("cuda_ipc", "nvshmem")
COPY_PATHS = {"shm": ("torch", "kernel"), "cuda_ipc": ("kernel", "torch"), "nvshmem": ("auto", "kernel", "put")}
SHAPES = {"smollm2-135m": (30, 3, 64), "llama-1b": (16, 8, 64), "llama-8b": (32, 8, 128)}  # layers, KV heads, dim


@dataclass(frozen=True)
class Shape:
    layers: int = 30
    kv_heads: int = 3
    head_dim: int = 64
    page_size: int = 16
    dtype: str = "bfloat16"

    def desc(self, num_pages: int) -> nk.PoolDescriptor:
        return nk.PoolDescriptor(self.dtype, self.layers, num_pages, self.page_size, self.kv_heads, self.kv_heads,
                                 self.head_dim)


@dataclass
class Result:
    backend: str
    device: str
    pages: int
    layout: str
    dtype: str
    bytes: int
    repeats: int
    threads: int
    seconds: float
    gbps: float
    baseline_seconds: float
    baseline_gbps: float
    ratio: float
    verified: bool
    layers: int
    page_size: int
    kv_heads: int
    head_dim: int
    copy_seconds: float | None = None    # GPU: the copy stream's busy span for every layer's writes
    copy_gbps: float | None = None
    d2d_gbps: float | None = None        # GPU: one contiguous device-to-device copy of the same bytes
    copy_vs_d2d: float | None = None
    copy_config: str | None = None       # GPU, kernel path: the page copy's tuned config(s)
    copy_path: str | None = None         # how the pages moved: "kernel" (page-copy kernel), else the backend's own


def page_lists(pages: int, pool_pages: int, layout: str, seed: int = 0) -> tuple[list[int], list[int]]:
    """Source pages [0, pages) and destination pages: one run at an offset, or a random set."""
    src = list(range(pages))
    if layout == "contiguous":
        return src, list(range(pool_pages - pages, pool_pages))
    return src, random.Random(seed).sample(range(pool_pages), pages)


def _digest(t: torch.Tensor) -> int:
    return int(t.contiguous().view(torch.uint8).to(torch.int64).sum())


def _copy_runs(dst: torch.Tensor, src: torch.Tensor, layer: int, runs: list[PageRun]) -> None:
    for r in runs:
        dst[:, layer, r.dst:r.dst + r.length].copy_(src[:, layer, r.src:r.src + r.length])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _sleep_cycles_per_s() -> float:
    """GPU clock cycles per second as `torch.cuda._sleep` spins them (measured, not read off a table)."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles // 10)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def _gpu_span(gate_s: float, cycles_per_s: float, enqueue) -> tuple[float, float]:
    """(GPU seconds from the gate's end to the copies' end, host seconds spent enqueuing).

    A spin kernel holds the compute stream for ``gate_s``; the transport's copy stream waits for compute
    before each write (`CopyOrder.before_copy`), so every copy queues behind the gate while the host
    enqueues them, and the span measures the copies alone, not the host's pace. ``enqueue`` must end
    with ``fence_compute`` (compute waits for the copies), so an event after it marks their end."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(gate_s * cycles_per_s))
    start.record()
    t0 = time.perf_counter()
    enqueue()
    host_s = time.perf_counter() - t0
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, host_s


def _d2d_seconds(nbytes: int, device: str, repeats: int) -> float:
    """Median seconds of one contiguous device-to-device copy of ``nbytes`` (the bandwidth reference)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    a.random_(0, 255)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


def _decode(backend: str, shape: Shape, pool_pages: int, threads: int, device: str, opts: dict[str, Any],
            conn: Any) -> None:
    """Decode rank: pool through the transport, then expect/wait rooms on command."""
    torch.set_num_threads(threads)
    t = nk.create(backend, **opts)
    try:
        desc = shape.desc(pool_pages)
        pool = t.allocate_pool(desc, device)
        conn.send(t.register_pool(pool, desc).to_json())
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                return
            if cmd[0] == "expect":
                t.expect(cmd[1], 1, deadline_s=120.0)
                conn.send("ok")
            elif cmd[0] == "wait":
                st = t.wait(cmd[1], timeout_s=120.0)
                done_ns = time.monotonic_ns()
                t.release(cmd[1])
                conn.send((st.done, st.reason, done_ns))
            elif cmd[0] == "digest":
                conn.send(_digest(pool[:, :, cmd[1]]))
    finally:
        t.close()


def _backend_opts(backend: str, shape: Shape, pool_pages: int, run_id: str,
                  copy: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(prefill opts, decode opts); nvshmem makes the two processes PEs 0 and 1 of one job.
    ``copy``: the writing side's copy path, one of the backend's `COPY_PATHS` (None: its default)."""
    if copy is not None and copy not in COPY_PATHS.get(backend, ()):
        raise ValueError(f"{backend}'s copy path is one of {COPY_PATHS.get(backend, ())}, got {copy!r}")
    sender = {"run_id": run_id, **({"copy": copy} if copy else {})}
    if backend != "nvshmem":
        return sender, {"run_id": run_id}
    from nvshmem_kv.backends.nvshmem import make_unique_id

    nbytes = shape.desc(pool_pages).pool_bytes
    common = {"npes": 2, "uid": make_unique_id(), "symmetric_bytes": nbytes}
    return {**sender, **common, "pe": 0}, {"run_id": run_id, **common, "pe": 1}


def measure(backend: str, pages: int, *, shape: Shape = Shape(), layout: str = "contiguous", repeats: int = 7,
            threads: int = 1, copy: str | None = None) -> Result:
    """Median transport time vs median in-process copy for ``pages`` pages of every layer.

    ``threads``: torch intra-op threads in both processes (1 = one core per engine, as the CPU
    appliance pins them; extra threads on a busy box make each copy wait for its slowest thread).
    """
    torch.set_num_threads(threads)
    device = "cuda" if backend in GPU_BACKENDS else "cpu"
    pool_pages = max(2 * pages, 8)
    src_desc = shape.desc(pool_pages)      # both pools have pool_pages pages; `pages` of them move
    src_pages, dst_pages = page_lists(pages, pool_pages, layout)
    runs = coalesce_runs(src_pages, dst_pages)
    nbytes = 2 * shape.layers * pages * src_desc.page_bytes
    prefill_opts, decode_opts = _backend_opts(backend, shape, pool_pages, f"bench{os.getpid()}", copy)

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_decode, args=(backend, shape, pool_pages, threads, device, decode_opts, child),
                       daemon=True)
    proc.start()
    child.close()
    tx = nk.create(backend, **prefill_opts)
    times: list[float] = []
    base_times: list[float] = []
    gpu = device == "cuda"
    span_times: list[float] = []
    gate_s = 0.02
    cycles_per_s = _sleep_cycles_per_s() if gpu else 0.0
    stopped = False
    try:
        g = torch.Generator(device=device).manual_seed(0)  # on the GPU: a 32K-token pool is gigabytes
        data = torch.randn(src_desc.shape, generator=g, device=device, dtype=src_desc.torch_dtype())
        if backend == "nvshmem":          # collective: the source pool comes from the symmetric heap too
            src = tx.allocate_pool(src_desc, device)
            src.copy_(data)
        else:
            src = data.to(device)
        baseline_dst = torch.zeros(src_desc.shape, dtype=src.dtype, device=device)
        if not conn.poll(120):
            raise RuntimeError("decode process did not start")
        peer = tx.connect(nk.PoolHandle.from_json(conn.recv()), src_desc)
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            for layer in range(shape.layers):
                _copy_runs(baseline_dst, src, layer, runs)
            _sync(device)
            base_times.append(time.perf_counter() - t0)

            room = f"bench-{i}"
            conn.send(("expect", room))
            conn.recv()
            # as rank 0's handoff does when a leg arrives: the answer is back by layer 0 (TP followers ask as the
            # step begins and moves as they write: their first layer may wait one round trip more)
            tx.open(peer, room)
            conn.send(("wait", room))
            start_ns = time.monotonic_ns()
            for layer in range(shape.layers):
                tx.write(peer, room, layer, src, src_pages, dst_pages)
            tx.signal(peer, room, b"")
            ok, reason, done_ns = conn.recv()
            if not ok:
                raise RuntimeError(f"room {room} failed: {reason}")
            times.append((done_ns - start_ns) / 1e9)
            if gpu:  # the same writes again, gated: the copy stream's own time (see _gpu_span)
                room = f"bench-span-{i}"
                conn.send(("expect", room))
                conn.recv()
                tx.open(peer, room)

                def enqueue(room: str = room) -> None:
                    for layer in range(shape.layers):
                        tx.write(peer, room, layer, src, src_pages, dst_pages)
                    tx.fence_compute()

                span, host_s = _gpu_span(gate_s, cycles_per_s, enqueue)
                if host_s > 0.8 * gate_s:  # the gate ended before the host had enqueued everything: longer
                    gate_s = 2 * host_s
                elif i > 0:                # i == 0 is the warm-up
                    span_times.append(span)
                conn.send(("wait", room))
                tx.signal(peer, room, b"")
                ok, reason, _ = conn.recv()
                if not ok:
                    raise RuntimeError(f"room {room} failed: {reason}")
        conn.send(("digest", dst_pages))
        verified = conn.recv() == _digest(src[:, :, src_pages]) if backend != "fake" else False
        stats = tx.stats()
        path = "kernel" if stats.kernel_writes == stats.writes else {"nvshmem": "put"}.get(backend, "torch")
        conn.send(("stop",))
        stopped = True
    except BaseException:
        # said before the close below: nvshmem's close is collective, so a decode rank that is stuck (or
        # gone) holds it up until the step's timeout kills this process, and the error with it
        print("bench.transfer failed; closing the transport:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        raise
    finally:
        if not stopped:  # the decode rank leaves its command loop for its own (collective) close
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        tx.close()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    secs, base = statistics.median(times[1:]), statistics.median(base_times[1:])
    gpu_figures: dict[str, float | str | None] = {}
    if gpu and span_times:
        span = statistics.median(span_times)
        d2d = _d2d_seconds(nbytes, device, repeats)
        gpu_figures = {"copy_seconds": span, "copy_gbps": nbytes / span / 1e9, "d2d_gbps": nbytes / d2d / 1e9,
                       "copy_vs_d2d": d2d / span}
        from kernels.page_copy import copy_pages_configs

        gpu_figures["copy_config"] = "; ".join(f"{k}: {v}" for k, v in copy_pages_configs().items()) or None
    gpu_figures["copy_path"] = path if backend not in ("tcp", "fake") else None
    return Result(backend, device, pages, layout, shape.dtype, nbytes, repeats, threads, secs, nbytes / secs / 1e9,
                  base, nbytes / base / 1e9, base / secs, verified, shape.layers, shape.page_size, shape.kv_heads,
                  shape.head_dim, **gpu_figures)


def _table(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    r0 = results[0]
    table = Table(title=f"KV transfer: {r0.layers} layers x {r0.kv_heads} KV heads x head_dim {r0.head_dim}, "
                        f"page {r0.page_size}, {r0.dtype}; median of {r0.repeats}, {r0.threads} torch thread(s)")
    gpu = any(r.copy_gbps is not None for r in results)
    cols = ["backend", "size", "layout", "MB", "ms", "GB/s", "baseline GB/s", "ratio", "verified"]
    if gpu:
        cols[-1:-1] = ["copy ms", "copy GB/s", "d2d GB/s", "copy/d2d"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("backend", "size", "layout") else "right")
    for r in results:
        name = r.backend if r.copy_path is None else f"{r.backend} ({r.copy_path})"
        row = [name, SIZES.get(r.pages, f"{r.pages} pages"), r.layout, f"{r.bytes / 1e6:.2f}",
               f"{r.seconds * 1e3:.2f}", f"{r.gbps:.2f}", f"{r.baseline_gbps:.2f}", f"{r.ratio:.2f}x"]
        if gpu:
            row += (["-"] * 4 if r.copy_gbps is None else
                    [f"{r.copy_seconds * 1e3:.3f}", f"{r.copy_gbps:.0f}", f"{r.d2d_gbps:.0f}", f"{r.copy_vs_d2d:.2f}x"])
        table.add_row(*row, "yes" if r.verified else "-")
    Console(width=max(132, Console().width)).print(table)


@click.command(help=__doc__.split("\n\n")[0], context_settings=HELP_OPTIONS)
@click.option("--backend", "backends", multiple=True, type=click.Choice(["shm", "tcp", "fake", *GPU_BACKENDS]),
              help="backend(s) to measure, repeatable (default: shm and tcp)")
@click.option("--pages", type=int, multiple=True, help="pages per transfer, repeatable (default: 1, 64, 512)")
@click.option("--layout", type=click.Choice(["contiguous", "scattered", "both"]), default=None,
              help="destination pages: one run, or a random set (default: contiguous; table: both)")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16")
@click.option("--layers", type=int, default=30)
@click.option("--kv-heads", type=int, default=3)
@click.option("--head-dim", type=int, default=64)
@click.option("--page-size", type=int, default=16)
@click.option("--shape", "shape_name", type=click.Choice(sorted(SHAPES)),
              help="a model's KV shape (sets --layers/--kv-heads/--head-dim)")
@click.option("--copy", type=click.Choice(["torch", "kernel", "auto", "put"]),
              help="the copy path: cuda_ipc torch|kernel, nvshmem auto|kernel|put (default: the transport's)")
@click.option("--repeats", type=int, default=7)
@click.option("--threads", type=int, default=1, help="torch threads per process (default 1: one core each)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (first backend and size)")
@click.option("--out", help="also write the JSON result(s) to this file")
def command(backends: tuple[str, ...], pages: tuple[int, ...], layout: str | None, dtype: str, layers: int,
            kv_heads: int, head_dim: int, page_size: int, shape_name: str | None, copy: str | None, repeats: int,
            threads: int, as_json: bool, out: str | None) -> int:
    if shape_name:
        layers, kv_heads, head_dim = SHAPES[shape_name]
    shape = Shape(layers, kv_heads, head_dim, page_size, DTYPES[dtype])
    backends = backends or ("shm", "tcp")
    wrong = [b for b in backends if copy is not None and copy not in COPY_PATHS.get(b, ())]
    if wrong:
        paths = ", ".join(b + " " + "|".join(p) for b, p in COPY_PATHS.items())
        raise click.BadParameter(f"{copy!r} is no copy path of {', '.join(wrong)} (the paths: {paths})",
                                 param_hint="--copy")
    if as_json:
        one_layout = layout if layout in ("contiguous", "scattered") else "contiguous"
        result = asdict(measure(backends[0], (pages or [64])[0], shape=shape, layout=one_layout,
                                repeats=repeats, threads=threads, copy=copy))
        print(json.dumps(result))
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    layouts = ["contiguous", "scattered"] if layout in (None, "both") else [layout]
    results: list[Result] = []
    for b in backends:
        for n in pages or DEFAULT_PAGES:
            for lay in layouts:
                if n == 1 and lay == "scattered":
                    continue
                results.append(measure(b, n, shape=shape, layout=lay, repeats=repeats, threads=threads, copy=copy))
                if out:  # after every figure: a later size that fails or times out keeps the earlier ones
                    with open(out, "w") as f:
                        json.dump([asdict(r) for r in results], f, indent=2)
    _table(results)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.transfer ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.transfer")


if __name__ == "__main__":
    raise SystemExit(main())

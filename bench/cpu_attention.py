"""pdbox's C attention kernels against the CPU backend's torch paths, one layer's call at a time.

    python -m bench.cpu_attention [--threads N] [--cold] [--dtype auto|bfloat16|float32]

Prefill: one request's causal attention over a paged cache (SmolLM2's 9 query / 3 KV heads of 64), whole
prompts and 256-token chunks after a cached prefix, through ``kernels.cpu.flash_extend`` and through the
backend's SDPA path. Decode: batches over 300- and 1024-token contexts, ``kernels.cpu.flash_decode``
against the backend's torch path. ``--cold`` evicts the caches (a 400 MB write) before every decode call,
as a serving step finds them: it has streamed every layer's weights and KV since. Medians of 9 calls.
``--dtype``: bf16 runs the AVX-512 BF16 kernels, fp32 the AVX2 ones; ``auto`` is the engine's default dtype here.
"""

from __future__ import annotations

import os
import sys

import click
import torch

from appliance.cli_support import HELP_OPTIONS, run_command

HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16
PREFILL = ((0, 256), (768, 256), (1280, 256), (0, 1024), (0, 1536))  # (cached prefix, new tokens)
DECODE = ((1, 64), (1, 1536), (6, 1024), (24, 300), (48, 300))  # (batch, context)


def _paged(lens: list[int], dtype: torch.dtype, spare: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches with each request's pages scattered, and the page table."""
    g = torch.Generator().manual_seed(0)
    need = [-(-n // PAGE) for n in lens]
    pages = sum(need) + spare
    k = torch.randn(pages, PAGE, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(pages, PAGE, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    perm = torch.randperm(pages, generator=g)
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    used = 0
    for b, p in enumerate(need):
        table[b, :p] = perm[used : used + p].to(torch.int32)
        used += p
    return k, v, table


def _median_ms(fn, repeats: int = 9, before=None) -> float:
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(threads: int, cold: bool, prefill_shapes: tuple[tuple[int, int], ...] = PREFILL,
        decode_shapes: tuple[tuple[int, int], ...] = DECODE, dtype: str = "auto") -> dict:
    from appliance.engine.attention_cpu import CpuAttentionBackend
    from appliance.engine.dtype import default_dtype

    torch.set_num_threads(threads)
    dtype = default_dtype("cpu") if dtype == "auto" else dtype
    fast, torch_path = CpuAttentionBackend(), CpuAttentionBackend(native_kernels=False)
    if dtype == "float32":
        if not (fast.native_extend_f32 and fast.native_decode_f32):
            raise click.ClickException("pdbox's fp32 C attention kernels are unavailable here (they need AVX2, FMA "
                                       "and a C compiler): see `pdbox doctor`")
    elif not fast.native_attention:
        raise click.ClickException(f"pdbox's C attention kernels are unavailable here: {fast.native_reason}")
    dt = getattr(torch, dtype)
    junk = torch.ones(100_000_000) if cold else None
    evict = (lambda: junk.add_(1)) if junk is not None else None
    scale = HEAD_DIM ** -0.5
    prefill = []
    with torch.inference_mode():
        for prefix, n in prefill_shapes:
            k, v, table = _paged([prefix + n], dt)
            q = torch.randn(n, HEADS, HEAD_DIM).to(dt)
            lens = (torch.tensor([prefix]), torch.tensor([n]))
            c = _median_ms(lambda: fast.extend(q, k, v, table, *lens, scale))  # noqa: B023
            t = _median_ms(lambda: torch_path.extend(q, k, v, table, *lens, scale))  # noqa: B023
            scores = HEADS * sum(prefix + i + 1 for i in range(n))
            prefill.append({"prefix": prefix, "new": n, "c_ms": round(c, 3), "torch_ms": round(t, 3),
                            "c_over_torch": round(c / t, 2), "c_g_scores_s": round(scores / c / 1e6, 2)})
        decode = []
        for batch, ctx in decode_shapes:
            k, v, table = _paged([ctx] * batch, dt)
            q = torch.randn(batch, HEADS, HEAD_DIM).to(dt)
            lens = torch.full((batch,), ctx)
            c = _median_ms(lambda: fast.decode(q, k, v, table, lens, scale), before=evict)  # noqa: B023
            t = _median_ms(lambda: torch_path.decode(q, k, v, table, lens, scale), before=evict)  # noqa: B023
            decode.append({"batch": batch, "context": ctx, "c_us": round(c * 1e3), "torch_us": round(t * 1e3),
                           "c_over_torch": round(c / t, 2)})
    return {"threads": threads, "cold": cold, "dtype": dtype, "prefill": prefill, "decode": decode}


@click.command(help=__doc__.splitlines()[0], context_settings=HELP_OPTIONS)
@click.option("--threads", type=click.IntRange(min=1), default=len(os.sched_getaffinity(0)))
@click.option("--cold", is_flag=True, help="evict the caches before every decode call (as a serving step finds them)")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="the kernels' dtype (auto: the engine's default on this machine)")
def command(threads: int, cold: bool, dtype: str) -> None:
    r = run(threads, cold, dtype=dtype)
    for p in r["prefill"]:
        print(f"prefill {p['new']:5d} new after {p['prefix']:5d} cached: C {p['c_ms']:8.3f} ms, SDPA path "
              f"{p['torch_ms']:8.3f} ms ({p['c_over_torch']:.2f}x; C at {p['c_g_scores_s']:.2f} G scores/s)")
    for d in r["decode"]:
        print(f"decode batch {d['batch']:3d} over {d['context']:5d}: C {d['c_us']:6d} us, torch path "
              f"{d['torch_us']:6d} us ({d['c_over_torch']:.2f}x){' cold' if r['cold'] else ''}")
    print(f"({r['threads']} threads, {r['dtype']}, one layer's call, medians of 9)")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.cpu_attention ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.cpu_attention")


if __name__ == "__main__":
    sys.exit(main())

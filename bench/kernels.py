"""Kernel bench: achieved GB/s (and TFLOP/s for extend attention) of each Triton kernel vs the device peak.

    python -m bench.kernels [--json] [--out FILE] [--strict]     # on a CUDA device
    python -m bench.kernels --cpu [--json] [--out FILE]          # tiny interpreter smoke, no GPU

The HBM peak comes from the device name (H100 SXM 3.35 TB/s, H200 4.8 TB/s, ...); for an unknown
device the measured device-to-device copy stands in. Every case is also checked against its torch
reference (``max_err``). Targets: decode attention >= 70% of the HBM peak, page copy >= 80% of a
device-to-device copy of the same bytes; ``--strict`` exits 1 when a target is missed.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from appliance.cli_support import HELP_OPTIONS, run_command

# (substring of torch.cuda.get_device_name, HBM bytes/s, dense bf16 FLOP/s); first match wins.
DEVICE_PEAKS: list[tuple[str, float, float | None]] = [
    ("GH200", 4.0e12, 989e12),
    ("H200", 4.8e12, 989e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 8.0e12, 2250e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100", 1.555e12, 312e12),
    ("L40S", 0.864e12, 362e12),
]


@dataclass
class Case:
    """One measured kernel call: ``fn`` runs it, ``check`` returns the max error against the reference."""

    name: str
    shape: str
    fn: Callable[[], Any]
    check: Callable[[], float]
    bytes: float
    flops: float = 0.0
    target: str = ""  # "d2d:0.80": at least this fraction of the d2d copy measured in the same run


@dataclass
class Result:
    name: str
    shape: str
    time_us: float
    gbps: float
    pct_of_peak: float | None
    tflops: float | None
    pct_of_flops_peak: float | None
    max_err: float
    target: str
    target_met: bool | None
    extra: dict[str, Any] = field(default_factory=dict)


def device_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    """``(name, hbm_bytes_per_s or None, bf16_flops or None)`` from the device name."""
    if device.type != "cuda":
        return "cpu (Triton interpreter)", None, None
    name = torch.cuda.get_device_name(device)
    for key, hbm, flops in DEVICE_PEAKS:
        if key in name:
            return name, hbm, flops
    return name, None, None


def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Median seconds per call: CUDA events via ``triton.testing.do_bench`` on a GPU, wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=200, return_mode="median") * 1e-3
    fn()  # first call builds the kernel
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def d2d_copy_gbps(device: torch.device, nbytes: int) -> float:
    """Achieved GB/s (read + write) of a plain device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_call(lambda: dst.copy_(src), device) / 1e9


def _err(a: Any, b: Any) -> float:
    if isinstance(a, tuple):
        return max(_err(x, y) for x, y in zip(a, b))
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _paged(batch: int, ctx: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per = -(-ctx // page_size)
    k = torch.randn(batch * per, page_size, kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    table = torch.randperm(batch * per, device=device).view(batch, per).to(torch.int32)
    return k, v, table


def build_cases(device: torch.device, dtype: torch.dtype, tiny: bool) -> list[Case]:
    """The benchmark set; ``tiny`` shrinks every shape for the interpreter smoke."""
    import kernels as K

    es = torch.empty((), dtype=dtype).element_size()
    cases: list[Case] = []

    # decode attention: batch 64, 4096 context, 32 q heads over 8 KV heads, head_dim 128
    b, ctx, qh, kvh, d, ps = (4, 40, 8, 2, 32, 4) if tiny else (64, 4096, 32, 8, 128, 16)
    k, v, table = _paged(b, ctx, kvh, d, ps, dtype, device)
    q = torch.randn(b, qh, d, device=device, dtype=dtype)
    seq = torch.full((b,), ctx, dtype=torch.int32, device=device)
    splits = K.default_num_splits(b, kvh, table.shape[1] * ps, device)
    cases.append(Case(
        "decode_attention", f"B={b} ctx={ctx} h={qh}/{kvh} d={d} page={ps} splits={splits}",
        lambda: K.decode_attention(q, k, v, table, seq, d**-0.5),
        lambda: _err(K.decode_attention(q, k, v, table, seq, d**-0.5),
                     K.decode_attention_ref(q, k, v, table, seq, d**-0.5)),
        bytes=2 * b * ctx * kvh * d * es + 2 * q.numel() * es + table.numel() * 4,
        flops=4 * b * qh * ctx * d, target="d2d:0.70",  # the bar: the copy measured in this run
    ))

    # extend attention: 4 requests, each 1024 new tokens after a 1024-token cached prefix
    b, pre, new = (2, 6, 10) if tiny else (4, 1024, 1024)
    k2, v2, table2 = _paged(b, pre + new, kvh, d, ps, dtype, device)
    q2 = torch.randn(b * new, qh, d, device=device, dtype=dtype)
    pl = torch.full((b,), pre, dtype=torch.int32, device=device)
    el = torch.full((b,), new, dtype=torch.int32, device=device)
    start = torch.arange(b, device=device, dtype=torch.int32) * new

    def extend() -> torch.Tensor:
        return K.extend_attention(q2, k2, v2, table2, pl, el, d**-0.5, extend_start_loc=start, max_extend_len=new)

    pairs = b * (new * pre + new * (new + 1) // 2)
    cases.append(Case(
        "extend_attention", f"B={b} prefix={pre} new={new} h={qh}/{kvh} d={d}", extend,
        lambda: _err(extend(), K.extend_attention_ref(q2, k2, v2, table2, pl, el, d**-0.5)),
        bytes=2 * b * (pre + new) * kvh * d * es + 2 * q2.numel() * es, flops=4 * pairs * qh * d,
    ))

    # KV store: one prefill chunk of tokens into scattered slots
    t = 64 if tiny else 16384
    kc, vc = torch.zeros_like(k), torch.zeros_like(v)
    kn = torch.randn(t, kvh, d, device=device, dtype=dtype)
    vn = torch.randn_like(kn)
    slots = torch.randperm(kc.shape[0] * ps, device=device)[:t]

    def store_check() -> float:
        rk, rv = kc.clone(), vc.clone()
        K.store_kv(kc, vc, kn, vn, slots)
        K.store_kv_ref(rk, rv, kn, vn, slots)
        return max(_err(kc, rk), _err(vc, rv))

    cases.append(Case("store_kv", f"T={t} h={kvh} d={d}", lambda: K.store_kv(kc, vc, kn, vn, slots),
                      store_check, bytes=4 * kn.numel() * es + slots.numel() * 8))

    # page copy: pages of (page, kv_heads, head_dim) into two destination pools by base address
    n = 8 if tiny else 4096
    src = torch.randn(n, ps, kvh, d, device=device, dtype=dtype)
    pools = [torch.zeros(n, ps, kvh, d, device=device, dtype=dtype) for _ in range(2)]
    bases = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=device)
    di = torch.arange(n, device=device) % 2
    sp = torch.randperm(n, device=device)
    dp = torch.randperm(n, device=device)

    def copy_check() -> float:
        want = [p.clone() for p in pools]
        K.copy_pages(src, bases, di, sp, dp)
        K.copy_pages_ref(src, want, di, sp, dp)
        return max(_err(a, b) for a, b in zip(pools, want))

    cases.append(Case("copy_pages", f"pages={n} page_bytes={src[0].numel() * es}",
                      lambda: K.copy_pages(src, bases, di, sp, dp), copy_check,
                      bytes=2 * src.numel() * es, target="d2d:0.80"))

    # a KV handoff's layer: SmolLM2's 6 KB pages, consecutive at both ends (a fresh decode pool's), page by
    # page and as the transport's runs of up to 64 KB (10 pages); the same bytes, one pool
    n6, run = (12, 5) if tiny else (4096, 10)
    src6 = torch.randn(n6, 16, 3, 64, device=device, dtype=dtype)
    dst6 = torch.zeros_like(src6)
    base6 = torch.tensor([dst6.data_ptr()], dtype=torch.int64, device=device)
    pages6 = torch.arange(n6, device=device)
    starts6 = torch.arange(0, n6, run, device=device)
    runs6 = torch.clamp(n6 - starts6, max=run)
    shape6 = f"pages={n6} page_bytes={src6[0].numel() * es}"
    for name, shape, call in (
        ("copy_pages_6k", shape6, lambda: K.copy_pages(src6, base6, torch.zeros_like(pages6), pages6, pages6)),
        ("copy_pages_6k_runs", f"{shape6} run={run}",
         lambda: K.copy_pages(src6, base6, torch.zeros_like(starts6), starts6, starts6, runs6, run)),
    ):
        def check6(call=call) -> float:
            dst6.zero_()
            call()
            return _err(dst6, src6)

        cases.append(Case(name, shape, call, check6, bytes=2 * src6.numel() * es))

    # pointwise kernels at prefill-chunk shapes
    t, hidden, inter = (16, 64, 96) if tiny else (8192, 4096, 14336)
    x = torch.randn(t, hidden, device=device, dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=dtype)
    cases.append(Case("rmsnorm", f"T={t} hidden={hidden}", lambda: K.rmsnorm(x, w, 1e-6),
                      lambda: _err(K.rmsnorm(x, w, 1e-6), K.rmsnorm_ref(x, w, 1e-6)), bytes=2 * x.numel() * es))
    cases.append(Case("fused_add_rmsnorm", f"T={t} hidden={hidden}", lambda: K.fused_add_rmsnorm(x, r, w, 1e-6),
                      lambda: _err(K.fused_add_rmsnorm(x, r, w, 1e-6), K.fused_add_rmsnorm_ref(x, r, w, 1e-6)),
                      bytes=4 * x.numel() * es))
    cache = K.rotary_cos_sin_cache(d, 4096, 1e4).to(device)
    qkv = torch.randn(t, qh + 2 * kvh, d, device=device, dtype=dtype)
    qv, kv_ = qkv[:, :qh], qkv[:, qh : qh + kvh]
    pos = torch.randint(0, 4096, (t,), device=device)
    cases.append(Case("rotary", f"T={t} h={qh}+{kvh} d={d}", lambda: K.rotary(qv, kv_, pos, cache),
                      lambda: _err(K.rotary(qv, kv_, pos, cache), K.rotary_ref(qv, kv_, pos, cache)),
                      bytes=2 * t * (qh + kvh) * d * es + t * d * 4))
    vv = qkv[:, qh + kvh:]
    kc2, vc2 = (torch.zeros(-(-t // ps) * 2, ps, kvh, d, device=device, dtype=dtype) for _ in range(2))
    slots2 = torch.randperm(kc2.shape[0] * ps, device=device)[:t]

    def rotary_store_check() -> float:
        rk, rv = kc2.clone(), vc2.clone()
        q_got = K.rotary_store_kv(qv, kv_, vv, pos, cache, kc2, vc2, slots2)
        q_want = K.rotary_store_kv_ref(qv, kv_, vv, pos, cache, rk, rv, slots2)
        return max(_err(q_got, q_want), _err(kc2, rk), _err(vc2, rv))

    cases.append(Case("rotary_store_kv", f"T={t} h={qh}+{kvh} d={d}",
                      lambda: K.rotary_store_kv(qv, kv_, vv, pos, cache, kc2, vc2, slots2), rotary_store_check,
                      bytes=2 * t * (qh + 2 * kvh) * d * es + t * d * 4 + t * 8))
    gu = torch.randn(t, 2 * inter, device=device, dtype=dtype)
    cases.append(Case("silu_and_mul", f"T={t} inter={inter}", lambda: K.silu_and_mul(gu),
                      lambda: _err(K.silu_and_mul(gu), K.silu_and_mul_ref(gu)), bytes=1.5 * gu.numel() * es))
    cases += _gemv_cases(K, device, dtype, hidden, inter)
    return cases


def _gemv_cases(K: Any, device: torch.device, dtype: torch.dtype, hidden: int, inter: int) -> list[Case]:
    """A batch-1 decode step's linear layers at Llama-3-8B's MLP shapes (weights of 235 and 117 MB:
    every call streams them from HBM, past the L2): pdbox's GEMV beside cuBLAS (also at 64 rows, the
    batch-64 step's, where the GEMV's wider row tile runs), and the down projection
    as SiLU-and-mul then the GEMV beside the GEMV that folds the activation into its load; gate/up as
    the residual-add RMSNorm then the GEMV beside `kernels.rmsnorm_gemv`, which folds both in (not for
    float16 weights, which keep the norm apart)."""
    w_up = torch.randn(2 * inter, hidden, device=device, dtype=dtype) * hidden**-0.5
    w_down = torch.randn(hidden, inter, device=device, dtype=dtype) * inter**-0.5
    x = torch.randn(1, hidden, device=device, dtype=dtype)
    x64 = torch.randn(64, hidden, device=device, dtype=dtype)
    gu = torch.randn(1, 2 * inter, device=device, dtype=dtype)
    up_bytes, down_bytes = w_up.numel() * w_up.element_size(), w_down.numel() * w_down.element_size()
    return [Case("gemv_b1", f"M=1 N={2 * inter} K={hidden}", lambda: K.gemv(x, w_up),
                  lambda: _err(K.gemv(x, w_up), K.gemv_ref(x, w_up)), bytes=up_bytes),
             Case("cublas_b1", f"M=1 N={2 * inter} K={hidden}", lambda: torch.nn.functional.linear(x, w_up),
                  lambda: _err(torch.nn.functional.linear(x, w_up), K.gemv_ref(x, w_up)), bytes=up_bytes),
             Case("gemv_b64", f"M=64 N={2 * inter} K={hidden}", lambda: K.gemv(x64, w_up),
                  lambda: _err(K.gemv(x64, w_up), K.gemv_ref(x64, w_up)), bytes=up_bytes),
             Case("cublas_b64", f"M=64 N={2 * inter} K={hidden}", lambda: torch.nn.functional.linear(x64, w_up),
                  lambda: _err(torch.nn.functional.linear(x64, w_up), K.gemv_ref(x64, w_up)), bytes=up_bytes),
             Case("down_b1_two_kernels", f"M=1 N={hidden} K={inter}", lambda: K.gemv(K.silu_and_mul(gu), w_down),
                  lambda: _err(K.gemv(K.silu_and_mul(gu), w_down), K.gemv_ref(gu, w_down, silu_mul=True)),
                  bytes=down_bytes),
             Case("down_b1_gemv_silu_mul", f"M=1 N={hidden} K={inter}", lambda: K.gemv(gu, w_down, silu_mul=True),
                  lambda: _err(K.gemv(gu, w_down, silu_mul=True), K.gemv_ref(gu, w_down, silu_mul=True)),
                  bytes=down_bytes)] + ([] if dtype == torch.float16 else _norm_gemv_cases(K, x, w_up))


def _norm_gemv_cases(K: Any, x: torch.Tensor, w_up: torch.Tensor) -> list[Case]:
    """gate/up after its block's residual add and RMSNorm: two kernels, then one."""
    r = torch.randn(x.shape, device=x.device, dtype=torch.float32)
    g = torch.rand(x.shape[1], device=x.device) + 0.5
    up_bytes = w_up.numel() * w_up.element_size()

    def apart() -> torch.Tensor:
        return K.gemv(K.fused_add_rmsnorm(x, r, g, 1e-6, w_up.dtype)[0], w_up)

    def want() -> torch.Tensor:
        return K.rmsnorm_gemv_ref(x, g, 1e-6, w_up, residual=r)[0]

    shape = f"M={x.shape[0]} N={w_up.shape[0]} K={w_up.shape[1]}"
    return [Case("gate_up_b1_norm_two_kernels", shape, apart, lambda: _err(apart(), want()), bytes=up_bytes),
            Case("gate_up_b1_rmsnorm_gemv", shape, lambda: K.rmsnorm_gemv(x, g, 1e-6, w_up, residual=r),
                 lambda: _err(K.rmsnorm_gemv(x, g, 1e-6, w_up, residual=r)[0], want()), bytes=up_bytes)]


def run(device: torch.device, dtype: torch.dtype, tiny: bool, only: list[str] | None,
        save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every case; returns the JSON-ready report, also handed to ``save`` after every case (a run
    cut short by a timeout keeps what it measured)."""
    name, hbm_peak, flops_peak = device_peaks(device)
    copy_bytes = (1 << 20) if tiny else (1 << 30)
    d2d = d2d_copy_gbps(device, copy_bytes)
    peak_gbps = hbm_peak / 1e9 if hbm_peak else d2d
    results: list[Result] = []
    failed: list[dict[str, str]] = []  # cases that raised: the rest still run (one has never run on a GPU)

    def report() -> dict[str, Any]:
        return {
            "device": name,
            "dtype": str(dtype).removeprefix("torch."),
            "interpreter": tiny,
            "peak_gbps": peak_gbps,
            "peak_source": "device table" if hbm_peak else "measured d2d copy",
            "peak_bf16_tflops": flops_peak / 1e12 if flops_peak else None,
            "d2d_copy_gbps": d2d,
            "results": [asdict(r) for r in results],
            "failed": failed,
        }

    for case in build_cases(device, dtype, tiny):
        if only and case.name not in only:
            continue
        try:
            err = case.check()
            sec = time_call(case.fn, device)
        except Exception as exc:  # recorded and reported: the bench exits 1 at the end
            traceback.print_exc()
            failed.append({"name": case.name, "shape": case.shape, "error": f"{type(exc).__name__}: {exc}"})
            if save is not None:
                save(report())
            continue
        gbps = case.bytes / sec / 1e9
        tflops = case.flops / sec / 1e12 if case.flops else None
        extra: dict[str, Any] = {}
        met: bool | None = None
        if case.target:
            kind, frac = case.target.split(":")
            base = {"d2d": d2d}[kind]
            extra[f"pct_of_{kind}"] = 100 * gbps / base
            met = None if tiny else gbps >= float(frac) * base
        results.append(Result(
            case.name, case.shape, sec * 1e6, gbps, 100 * gbps / peak_gbps if not tiny else None,
            tflops, 100 * tflops * 1e12 / flops_peak if tflops and flops_peak else None, err,
            case.target, met, extra,
        ))
        if save is not None:
            save(report())
    return report()


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"{report['device']}  {report['dtype']}  peak {report['peak_gbps']:.0f} GB/s "
             f"({report['peak_source']}), d2d copy {report['d2d_copy_gbps']:.0f} GB/s")
    table = Table(title=title)
    for col in ("kernel", "shape", "time us", "GB/s", "% peak", "TFLOP/s", "max err", "target"):
        table.add_column(col, justify="left" if col in ("kernel", "shape") else "right")
    for r in report["results"]:
        pct = "-" if r["pct_of_peak"] is None else f"{r['pct_of_peak']:.0f}%"
        tflops = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        if r["target"]:
            kind, frac = r["target"].split(":")
            got = r["extra"][f"pct_of_{kind}"]
            mark = {None: "", True: " [green]ok[/]", False: " [red]MISS[/]"}[r["target_met"]]
            target = f">={float(frac) * 100:.0f}% {kind}: {got:.0f}%{mark}"
        else:
            target = ""
        table.add_row(r["name"], r["shape"], f"{r['time_us']:.1f}", f"{r['gbps']:.1f}", pct, tflops,
                      f"{r['max_err']:.2e}", target)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(table)
    if report["interpreter"]:
        console.print("[yellow]interpreter smoke on CPU: correctness only, the rates mean nothing[/]")


@click.command(help=__doc__.splitlines()[0], context_settings=HELP_OPTIONS)
@click.option("--cpu", is_flag=True, help="tiny shapes under the Triton interpreter (no GPU)")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the table")
@click.option("--out", type=click.Path(path_type=Path), help="also write the JSON report to this file")
@click.option("--dtype", type=click.Choice(("bfloat16", "float16")), default="bfloat16")
@click.option("--only", multiple=True, help="kernel names to run (default: all)")
@click.argument("more_only", nargs=-1, metavar="")
@click.option("--strict", is_flag=True, help="exit 1 when a target is missed")
def command(cpu: bool, as_json: bool, out: Path | None, dtype: str, only: tuple[str, ...],
            more_only: tuple[str, ...], strict: bool) -> int:
    if more_only and not only:
        raise click.UsageError(f"unexpected argument {more_only[0]!r} (kernel names follow --only)")
    if cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench.kernels: no CUDA device here; the kernel bench needs a GPU. "
              "Run `python -m bench.kernels --cpu` for a tiny interpreter smoke.", file=sys.stderr)
        return 2
    torch.manual_seed(0)

    def save(partial: dict[str, Any]) -> None:
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(partial, indent=1))

    report = run(device, getattr(torch, dtype), cpu, [*only, *more_only] or None, save)
    save(report)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    for f in report["failed"]:
        print(f"bench.kernels: {f['name']} ({f['shape']}) failed: {f['error']}", file=sys.stderr)
    missed = [r["name"] for r in report["results"] if r["target_met"] is False]
    return 1 if report["failed"] or (strict and missed) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.kernels ARGS``; returns the exit status (2: a bad option, or no CUDA device)."""
    return run_command(command, argv, "python -m bench.kernels")


if __name__ == "__main__":
    sys.exit(main())

"""Compile the engine's Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter runs the kernels' logic on CPU but accepts programs the GPU compiler refuses, and the
GPU check runs only when a machine is lent. Triton compiles ahead of time for a named target with
the LLVM and ptxas in its wheel, so each wrapper's launch is captured on CPU tensors at the engine's
bf16 shapes (its arguments, the kernel's first GPU config) and compiled for sm_90; the PTX says what
a GPU would run, e.g. whether global loads and stores are 16-byte vectors; the compile's shared
memory says whether a launch would fit an SM (on a GPU, Triton refuses one that does not at launch), and
ptxas (Triton's own, run again with ``-v``) says how many registers a thread takes and whether it spills.

Run as ``python -m tests.kernels.sm90`` WITHOUT ``TRITON_INTERPRET`` (triton builds its own library
functions for the interpreter when that is set at import, and they cannot be compiled): it prints one
JSON object, per case the kernels launched, the widths of their global loads and stores and, for each
config, the shared memory, the registers and the bytes spilled to local memory.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

BF16 = torch.bfloat16
HEADS, KV_HEADS, DIM, PAGE = 32, 8, 128, 16  # Llama-3-8B's attention
_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
        torch.int32: "*i32", torch.int16: "*i16", torch.uint8: "*u8"}


@dataclass
class Launch:
    """One captured launch: the kernel function, its runtime arguments and its meta-parameters."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    metas: list[dict[str, Any]]  # one per GPU config (the autotuner compiles them all), first config first
    nospec: tuple[str, ...] = ()  # the kernel's do_not_specialize: never marked 16-divisible


def _capture(call: Callable[[], Any]) -> list[Launch]:
    """The launches ``call`` makes, not run, each with every GPU config of its kernel."""
    from kernels._triton import LazyKernel

    seen: list[Launch] = []

    def getitem(self: LazyKernel, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            configs = [c for c in self.configs if c is not None]
            if self.pdl:  # as on a Hopper GPU: the PDL guard compiled in, the launch option set
                kwargs = {**kwargs, "USE_GDC": True, "launch_pdl": True}
            metas = [{**kwargs, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
            seen.append(Launch(self.fn, args, metas or [dict(kwargs)], tuple(self.do_not_specialize)))

        return launch

    original = LazyKernel.__getitem__
    LazyKernel.__getitem__ = getitem  # type: ignore[method-assign]
    try:
        call()
    finally:
        LazyKernel.__getitem__ = original  # type: ignore[method-assign]
    return seen


def _arg_type(value: Any) -> tuple[str, bool]:
    """Triton's signature type of a runtime argument, and whether Triton would mark it 16-divisible."""
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i64" if abs(value) >= 2**31 else "i32"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_sm90(launch: Launch, meta: dict[str, Any]) -> tuple[str, int]:
    """The PTX of ``launch``'s kernel with meta-parameters ``meta`` for sm_90, and the bytes of shared
    memory a program of it takes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps", 4), "num_stages": meta.pop("num_stages", 2),
               "enable_fp_fusion": True, "launch_pdl": meta.pop("launch_pdl", False)}
    names = list(inspect.signature(launch.fn).parameters)
    runtime = [n for n in names if n not in meta]
    if len(runtime) != len(launch.args):
        raise TypeError(f"{launch.fn.__name__}: {len(launch.args)} arguments for parameters {runtime}")
    values = dict(zip(runtime, launch.args))
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(names):
        if name in meta:
            signature[name], constexprs[(i,)] = "constexpr", meta[name]
            continue
        if type(values[name]) is int and values[name] == 1 and name not in launch.nospec:
            signature[name], constexprs[(i,)] = "constexpr", 1  # Triton compiles an int equal to 1 in as a constant
            continue
        signature[name], divisible = _arg_type(values[name])
        if divisible and name not in launch.nospec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=triton.jit(launch.fn), signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ptx"], int(compiled.metadata.shared)


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers a thread, bytes of spill stores) of ``ptx`` for sm_90a, from Triton's ptxas with ``-v``."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/kernel.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", src, "-o", f"{tmp}/kernel.cubin"],
                             capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {run.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores", run.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"no register or spill count in ptxas -v's output: {run.stderr[-2000:]}")
    return int(regs.group(1)), int(spills.group(1))


def memory_before_wait(ptx: str) -> int:
    """Global memory instructions (loads, stores, async copies, atomics) before ``griddepcontrol.wait`` in
    the kernel's body; 0 where it has none or no wait. Under PDL such an access would race the kernel before."""
    body = ptx[ptx.find(".entry"):]
    wait = body.find("griddepcontrol.wait")
    if wait < 0:
        return 0
    return len(re.findall(r"\b(?:ld\.global|st\.global|cp\.async|atom\.global|red\.global)", body[:wait]))


def _widths(ptx: str, op: str) -> list[str]:
    """The widths of the PTX's global ``op`` (ld/st) instructions: b16, b64, v2.b64, v4.b32, ..."""
    return sorted(set(re.findall(rf"\b{op}\.global(?:\.[a-z]+)*\.(v[24]\.b\d+|b\d+)", ptx)))


def _async_bytes(ptx: str) -> list[int]:
    """The sizes of the PTX's pipelined global-to-shared copies (cp.async), in bytes."""
    return sorted({int(n, 16) for n in re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)",
                                                  ptx)})


def _cases() -> dict[str, Callable[[], Any]]:
    import kernels

    def cache(pages: int = 8) -> torch.Tensor:
        return torch.zeros(pages, PAGE, KV_HEADS, DIM, dtype=BF16)

    q4, table, lens = torch.zeros(4, HEADS, DIM, dtype=BF16), torch.zeros(4, 4, dtype=torch.int32), torch.full((4,), 40)
    q32 = torch.zeros(32, HEADS, DIM, dtype=BF16)
    qkv = torch.zeros(4, HEADS + 2 * KV_HEADS, DIM, dtype=BF16)
    q, k, v = qkv[:, :HEADS], qkv[:, HEADS:HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS:]
    pos, slots, cos_sin = torch.arange(4), torch.tensor([3, 17, 40, 99]), torch.zeros(128, DIM)
    x, r, w = torch.zeros(4, 4096, dtype=BF16), torch.zeros(4, 4096), torch.zeros(4096)
    x64, r64 = torch.zeros(64, 4096, dtype=BF16), torch.zeros(64, 4096)
    pool = torch.zeros(2 * 4 * 64, PAGE, 3, 64, dtype=BF16)  # SmolLM2's 6 KB pages
    dst, idx = torch.zeros_like(pool), torch.arange(256)
    half = torch.zeros(256, PAGE, KV_HEADS // 2, DIM, dtype=BF16)  # a TP-2 prefill rank's half of 8B's KV heads
    into_tp1 = kernels.RowSlice(PAGE, KV_HEADS // 2 * DIM, KV_HEADS // 2 * DIM, 0, KV_HEADS * DIM, KV_HEADS // 2 * DIM)
    f32 = torch.float32

    def tiny(pages: int = 8) -> torch.Tensor:  # the fp32 tests' tiny model: 4 heads of 16 over 2 KV heads
        return torch.zeros(pages, PAGE, 2, 16, dtype=f32)

    return {
        "decode_attention": lambda: kernels.decode_attention(q4, cache(), cache(), table, lens, 0.1, num_splits=4),
        # a CUDA graph's step: the int64 table column-major (graph_plan), 16 splits
        "decode_attention_graph": lambda: kernels.decode_attention(
            q4, cache(), cache(), table.long().t().contiguous().t(), lens, 0.1, num_splits=16),
        # one split (a bucket that fills the GPU, e.g. 128 and 256 rows on 132 SMs): the output written at once
        "decode_attention_unsplit": lambda: kernels.decode_attention(q4, cache(), cache(), table, lens, 0.1,
                                                                     num_splits=1),
        "decode_attention_fp32": lambda: kernels.decode_attention(torch.zeros(4, 4, 16, dtype=f32), tiny(), tiny(),
                                                                  table, lens, 0.25, num_splits=4),
        "extend_attention_fp32": lambda: kernels.extend_attention(
            torch.zeros(32, 4, 16, dtype=f32), tiny(), tiny(), table[:2], torch.tensor([0, 32]),
            torch.tensor([24, 8]), 0.25, extend_start_loc=torch.tensor([0, 24]), max_extend_len=24),
        "extend_attention": lambda: kernels.extend_attention(
            q32, cache(), cache(), table[:2], torch.tensor([0, 32]), torch.tensor([24, 8]), 0.1,
            extend_start_loc=torch.tensor([0, 24]), max_extend_len=24),
        "fused_add_rmsnorm": lambda: kernels.fused_add_rmsnorm(x, r, w, 1e-6, BF16),
        "rmsnorm": lambda: kernels.rmsnorm(r, w, 1e-6),  # the final norm, on the fp32 residual stream
        "rotary_store_kv": lambda: kernels.rotary_store_kv(q, k, v, pos, cos_sin, cache(), cache(), slots),
        "rotary": lambda: kernels.rotary(q, k, pos, cos_sin),
        "store_kv": lambda: kernels.store_kv(cache(), cache(), k, v, slots),
        "silu_and_mul": lambda: kernels.silu_and_mul(torch.zeros(4, 2 * 14336, dtype=BF16)),
        "copy_pages": lambda: kernels.copy_pages(pool, torch.tensor([dst.data_ptr()]), torch.zeros_like(idx), idx, idx),
        "copy_pages_runs": lambda: kernels.copy_pages(pool, torch.tensor([dst.data_ptr()]), torch.zeros_like(idx[:128]),
                                                      2 * idx[:128], 2 * idx[:128], torch.full((128,), 2), 2),
        # the second half of each token row of a decode page, from a TP-2 prefill rank (runs of 2 pages)
        "copy_pages_slice": lambda: kernels.copy_pages(half, torch.tensor([dst.data_ptr()]), torch.zeros_like(idx[:64]),
                                                       2 * idx[:64], 2 * idx[:64], torch.full((64,), 2), 2,
                                                       rows=into_tp1),
        "gemv": lambda: [kernels.gemv(torch.zeros(m, 4096, dtype=dt), torch.zeros(6144, 4096, dtype=dt))
                         for m, dt in ((1, BF16), (16, BF16), (4, torch.float32))],
        # the LM head: the final norm's fp32 rows against bf16 weights (Llama-3's vocabulary divides by 16 too)
        "gemv_lm_head": lambda: [kernels.gemv(torch.zeros(m, 4096, dtype=f32), torch.zeros(4096, 4096, dtype=BF16))
                                 for m in (1, 16)],
        "gemv_silu_mul": lambda: [kernels.gemv(torch.zeros(m, 2 * 14336, dtype=BF16),
                                               torch.zeros(4096, 14336, dtype=BF16), silu_mul=True) for m in (4, 1)],
        # the residual add and RMSNorm folded in (a layer after its attention block), then the first
        # layer's: the fp32 embeddings normed alone; then with QKV's bias (Qwen2)
        "rmsnorm_gemv": lambda: [kernels.rmsnorm_gemv(x, w, 1e-6, torch.zeros(6144, 4096, dtype=BF16), residual=r),
                                 kernels.rmsnorm_gemv(r, w, 1e-6, torch.zeros(6144, 4096, dtype=BF16)),
                                 kernels.rmsnorm_gemv(x, w, 1e-6, torch.zeros(6144, 4096, dtype=BF16),
                                                      torch.zeros(6144, dtype=BF16), residual=r)],
        # 32 and 64 rows (decode's buckets past 16): a wider row tile, its own configs; every form at 64 rows,
        # fp32 weights (the API takes them) and the LM head's fp32 rows the widest in shared memory
        "gemv_wide": lambda: [kernels.gemv(torch.zeros(m, 4096, dtype=dt), torch.zeros(6144, 4096, dtype=dt))
                              for m, dt in ((32, BF16), (64, BF16), (64, f32))]
        + [kernels.gemv(torch.zeros(64, 4096, dtype=f32), torch.zeros(4096, 4096, dtype=BF16)),
           kernels.gemv(torch.zeros(64, 2 * 14336, dtype=BF16), torch.zeros(4096, 14336, dtype=BF16), silu_mul=True),
           kernels.rmsnorm_gemv(x64, w, 1e-6, torch.zeros(6144, 4096, dtype=BF16), residual=r64),
           kernels.rmsnorm_gemv(r64, w, 1e-6, torch.zeros(6144, 4096, dtype=BF16), torch.zeros(6144, dtype=BF16))],
    }


def main() -> int:
    import kernels._triton as kt

    if kt.interpreter_enabled():
        print("run without TRITON_INTERPRET: the interpreter's library functions cannot be compiled", file=sys.stderr)
        return 2
    kt.interpreter_enabled = lambda: True  # the wrappers' device checks take CPU tensors ...
    for name in ("kernels.decode_attention", "kernels.extend_attention"):
        importlib.import_module(name).interpreter_enabled = lambda: False  # ... and pick the GPU's meta
    report: dict[str, list[dict[str, Any]]] = {}
    for case, call in _cases().items():
        report[case] = []
        for launch in _capture(call):
            ptx, shared = compile_sm90(launch, launch.metas[0])  # the config the engine runs untuned
            others = [compile_sm90(launch, meta) for meta in launch.metas[1:]]
            compiled = 1 + sum(bool(p) for p, _ in others)
            every = [ptx] + [p for p, _ in others]  # each config's PTX, the first config's first
            usage = [ptxas_usage(p) for p in every]
            report[case].append({"kernel": launch.fn.__name__, "entries": ptx.count(".entry"), "mma": "mma" in ptx,
                                 "gdc": [op for op in ("wait", "launch_dependents") if f"griddepcontrol.{op}" in ptx],
                                 "ld": _widths(ptx, "ld"), "st": _widths(ptx, "st"), "async": _async_bytes(ptx),
                                 "configs": len(launch.metas),
                                 "compiled": compiled, "shared": [shared] + [s for _, s in others],
                                 "regs": [r for r, _ in usage], "spill": [s for _, s in usage],
                                 "before_wait": sum(memory_before_wait(p) for p in every)})
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

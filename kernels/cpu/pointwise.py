"""A layer's pointwise pieces in pdbox's own C kernels: residual add with RMSNorm, rotary, SiLU-and-mul,
each one pass and one call where torch takes several ops, and the KV store. bf16 rows run
``pointwise.c`` (AVX-512 BF16), fp32 rows ``pointwise_f32.c`` (AVX2); each function takes either.

The same functions as ``kernels.fused_add_rmsnorm_ref``, ``rotary_ref`` and ``silu_and_mul_ref`` (fp32
math, one rounding to bf16 at the end in bf16); the references stay the oracle.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from kernels.cpu.build import AVX2_CFLAGS, AVX2_FLAGS, Native, load

_I64, _I32, _P, _F = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
DTYPES = (torch.bfloat16, torch.float32)


def native(dtype: torch.dtype = torch.bfloat16) -> Native:
    """The kernels' library for ``dtype`` rows, or why this machine has none (built on the first call in a
    process)."""
    if dtype not in DTYPES:
        raise ValueError(f"the pointwise kernels take bf16 or fp32 rows, not {dtype}")
    f32 = dtype == torch.float32
    built = load("pointwise_f32", needs=AVX2_FLAGS, cflags=AVX2_CFLAGS) if f32 else load("pointwise")
    sfx = "_f32" if f32 else ""
    if built.lib is not None and not getattr(getattr(built.lib, "pdbox_rotary" + sfx), "argtypes", None):
        names = ("add_rmsnorm", "silu_and_mul", "rotary", "store_kv")
        fns = [getattr(built.lib, f"pdbox_{name}{sfx}") for name in names]
        fns[0].argtypes = [_P, _I64, _P, _I64, _P, _P, _P, _I32, _I32, _F, _I32]
        fns[1].argtypes = [_P, _I64, _P, _I32, _I32, _I32]
        fns[2].argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _I32, _I32, _I32, _I32]
        fns[3].argtypes = [_P, _I64, _P, _I64, _P, _I32, _I64, _P, _P, _I64]
        for fn in fns:
            fn.restype = _I32
    return built


@cache
def _fn(name: str, dtype: torch.dtype):
    """Kernel ``name`` for ``dtype`` rows."""
    lib = native(dtype).required(f"the native CPU pointwise kernels ({dtype})")
    return getattr(lib, f"pdbox_{name}{'_f32' if dtype == torch.float32 else ''}")


def _rows(name: str, t: torch.Tensor, dtype: torch.dtype, width: int | None = None) -> None:
    """``t`` must be a 2-D CPU tensor of ``dtype`` with unit column stride (rows may be strided)."""
    if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name} must be a 2-D {dtype} CPU tensor with contiguous rows, got {t.dtype} "
                         f"{tuple(t.shape)} strides {t.stride()} on {t.device}")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} must be {width} wide, got {t.shape[1]}")


def add_rmsnorm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                threads: int = 1, dtype: torch.dtype = torch.bfloat16,
                checked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dtype(rmsnorm(residual + x) * weight), residual + x)``: ``x`` ``(T, H)`` of ``dtype`` (bf16 or fp32)
    or ``None`` (no add), ``residual`` and ``weight`` fp32; the new residual is a new fp32 tensor.
    ``checked=False`` skips the argument checks (a caller that made them; see `CHECKS`)."""
    h = residual.shape[-1]
    if x is not None:
        dtype = x.dtype if x.dtype in DTYPES else dtype
    if checked:
        _rows("residual", residual, torch.float32)
        if x is not None:
            _rows("x", x, dtype, h)
            if x.shape[0] != residual.shape[0]:
                raise ValueError(f"x has {x.shape[0]} rows, residual {residual.shape[0]}")
        if weight.dtype != torch.float32 or weight.shape != (h,) or not weight.is_contiguous() or h % 16:
            raise ValueError(f"weight must be a contiguous fp32 ({h},) and {h} a multiple of 16")
    rows = residual.shape[0]
    new_residual = torch.empty(rows, h, dtype=torch.float32)
    out = torch.empty(rows, h, dtype=dtype)
    rc = _fn("add_rmsnorm", dtype)(None if x is None else x.data_ptr(), 0 if x is None else x.stride(0),
                                  residual.data_ptr(), residual.stride(0), new_residual.data_ptr(), weight.data_ptr(),
                                  out.data_ptr(), rows, h, eps, max(1, threads))
    if rc != 0:
        raise RuntimeError(f"pdbox_add_rmsnorm refused its arguments (code {rc})")
    return out, new_residual


def silu_and_mul(x: torch.Tensor, threads: int = 1, checked: bool = True) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate, up]`` ``(T, 2n)``, bf16 (rounded once) or fp32."""
    n = x.shape[1] // 2
    if checked:
        _rows("x", x, x.dtype if x.dtype in DTYPES else torch.bfloat16)
        if x.shape[1] % 32:
            raise ValueError(f"x's width must be 2n with n a multiple of 16, got {x.shape[1]}")
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    rc = _fn("silu_and_mul", x.dtype)(x.data_ptr(), x.stride(0), out.data_ptr(), x.shape[0], n, max(1, threads))
    if rc != 0:
        raise RuntimeError(f"pdbox_silu_and_mul refused its arguments (code {rc})")
    return out


def rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, threads: int = 1,
           check_positions: bool = True, checked: bool = True) -> torch.Tensor:
    """Rotate-half rotary of ``x`` bf16 or fp32 ``(T, heads, D)`` (rows and heads may be strided) at ``positions``
    into a new contiguous tensor; ``cos_sin_cache`` fp32 ``(max_position, D)``, cos then sin.
    ``check_positions=False`` skips the range check (a caller that checked these positions already),
    ``checked=False`` the others (a caller that made them)."""
    t, heads, d = x.shape
    if checked:
        if x.dtype not in DTYPES or x.device.type != "cpu" or x.dim() != 3 or x.stride(2) != 1:
            raise ValueError(f"x must be a (tokens, heads, head_dim) bf16 or fp32 CPU tensor with contiguous heads, "
                             f"got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
        if d % 32:
            raise ValueError(f"head_dim must be a multiple of 32, got {d}")
        if (cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d
                or cos_sin_cache.stride(1) != 1):
            raise ValueError(f"cos_sin_cache must be fp32 (positions, {d}) with contiguous rows, got "
                             f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
        if positions.dtype != torch.int64 or positions.shape != (t,) or not positions.is_contiguous():
            raise ValueError(f"positions must be a contiguous int64 ({t},), got {positions.dtype} "
                             f"{tuple(positions.shape)}")
    if check_positions and t and (int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]):
        raise ValueError(f"positions must lie in [0, {cos_sin_cache.shape[0]})")
    out = torch.empty(t, heads, d, dtype=x.dtype)
    rc = _fn("rotary", x.dtype)(x.data_ptr(), x.stride(0), x.stride(1), positions.data_ptr(), cos_sin_cache.data_ptr(),
                             cos_sin_cache.stride(0), out.data_ptr(), t, heads, d, max(1, threads))
    if rc != 0:
        raise RuntimeError(f"pdbox_rotary refused its arguments (code {rc})")
    return out


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` ``(T, kv_heads, head_dim)`` rows (bf16 or fp32, the caches' dtype) into cache slots
    ``slot_mapping`` (int64, ``page * page_size + offset``) of the contiguous ``(pages, page_size, kv_heads,
    head_dim)`` caches; nothing is written when a slot lies outside them."""
    t = k.shape[0]
    dtype = k_cache.dtype if k_cache.dtype in DTYPES else torch.bfloat16
    for name, x in (("k", k), ("v", v)):
        if x.dtype != dtype or x.dim() != 3 or x.shape != (t, *k_cache.shape[2:]) or x.stride(2) != 1 \
                or x.stride(1) != x.shape[2]:
            raise ValueError(f"{name} must be {dtype} (tokens, {k_cache.shape[2]}, {k_cache.shape[3]}) with contiguous "
                             f"heads, got {x.dtype} {tuple(x.shape)} strides {x.stride()}")
    if (k_cache.dtype != dtype or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        raise ValueError("the caches must be equal contiguous bf16 or fp32 tensors")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (t,) or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be a contiguous int64 ({t},), got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    total = k_cache.shape[0] * k_cache.shape[1]
    rc = _fn("store_kv", dtype)(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slot_mapping.data_ptr(), t,
                               k_cache.shape[2] * k_cache.shape[3], k_cache.data_ptr(), v_cache.data_ptr(), total)
    if rc == -2:
        raise ValueError(f"a slot lies outside the caches' {total} slots: {slot_mapping.tolist()[:16]}")
    if rc != 0:
        raise RuntimeError(f"pdbox_store_kv refused its arguments (code {rc})")

"""One decode layer of a Llama-family model with quantized weights in one call: the kernel calls the
``cpu`` backend makes for it (norm, QKV, rotary, KV store, attention, O, norm, gate/up, SwiGLU down) made
from C, to the same bits, without the Python between them. fp32 layers run ``decode_layer_f32.c`` (AVX2);
bf16 layers ``decode_layer_bf16.c`` (AVX-512 BF16), which also makes the bf16/fp32 conversions the
backend makes in torch around each quantized GEMV.

A layer's weights, rotary table and KV cache are checked once (:meth:`DecodeLayer.build`); a step's
positions, slots and page table once per step (:meth:`DecodeStep.build`); each call checks only its rows.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from kernels.cpu.build import AVX2_CFLAGS, AVX2_FLAGS, Native, load
from kernels.cpu.flash_decode import MAX_GROUP, DecodeTable, native_f32
from kernels.cpu.flash_extend import native as native_bf16_attention
from kernels.cpu.pointwise import native as pointwise_native
from kernels.cpu.quant_gemv import MAX_ROWS, Q4Weight, Q8Weight
from kernels.cpu.quant_gemv import native as quant_native

_P, _I32, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
MAX_HEAD_DIM = 256  # decode_f32.c's and flash_attention.c's MAX_D
STEPS = ("", "its arguments", "scratch memory", "the input norm", "the QKV projection", "rotary", "the KV store",
         "attention", "the output projection", "the post-attention norm", "the gate/up projection",
         "the down projection", "SiLU-and-mul")  # decode_layer_*.c's E_* codes
DTYPES = (torch.float32, torch.bfloat16)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the C files' and functions' names
_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class _Kernels(ctypes.Structure):
    _fields_ = [("add_rmsnorm", _P), ("quant_linear", _P), ("rotary", _P), ("store_kv", _P), ("decode", _P)]


class _KernelsBF16(ctypes.Structure):
    _fields_ = [("add_rmsnorm", _P), ("add_rmsnorm_f32", _P), ("quant_linear", _P), ("rotary", _P),
                ("store_kv", _P), ("decode", _P), ("silu_and_mul", _P)]


class _QWeight(ctypes.Structure):
    _fields_ = [("codes", _P), ("params", _P), ("bits", _I32), ("n", _I32), ("k", _I32)]


class _Layer(ctypes.Structure):
    _fields_ = [("hidden", _I32), ("hq", _I32), ("hkv", _I32), ("d", _I32), ("inter", _I32), ("page_size", _I32),
                ("eps", _F), ("scale", _F), ("input_norm", _P), ("post_norm", _P), ("qkv", _QWeight), ("o", _QWeight),
                ("gate_up", _QWeight), ("down", _QWeight), ("cos_sin", _P), ("cos_sin_row", _I64),
                ("k_cache", _P), ("v_cache", _P), ("page_stride", _I64), ("total_slots", _I64)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I32), ("positions", _P), ("slots", _P), ("table", _P), ("lens", _P), ("table_row", _I64)]


def native(dtype: torch.dtype = torch.float32) -> Native:
    """The ``dtype`` layer's library, or why this machine has none: it needs the libraries of the kernels it
    calls too (each built on its first call in a process): for fp32, the fp32 pointwise, quantized GEMV and
    fp32 decode attention; for bf16, the bf16 and fp32 pointwise, the quantized GEMV and bf16 attention."""
    if dtype not in DTYPES:
        raise ValueError(f"the one-call decode layer runs fp32 or bf16 layers, not {dtype}")
    bf16 = dtype == torch.bfloat16
    needs = ((pointwise_native(torch.bfloat16), pointwise_native(torch.float32), quant_native(),
              native_bf16_attention()) if bf16 else (pointwise_native(torch.float32), quant_native(), native_f32()))
    for other in needs:
        if other.lib is None:
            return other
    name = f"decode_layer_{_SUFFIX[dtype]}"
    built = load(name) if bf16 else load(name, needs=AVX2_FLAGS, cflags=AVX2_CFLAGS)
    fn = getattr(built.lib, f"pdbox_{name}", None) if built.lib is not None else None
    if fn is not None and not getattr(fn, "argtypes", None):
        fn.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I32]
        fn.restype = _I32
    return built


def _addr(fn: ctypes._CFuncPtr) -> int:
    return ctypes.cast(fn, _P).value or 0


@cache
def _kernels(dtype: torch.dtype) -> _Kernels | _KernelsBF16:
    """The kernels' addresses, from their own libraries (the functions the per-op calls use)."""
    pw32, quant = pointwise_native(torch.float32).lib, quant_native().lib
    if dtype == torch.bfloat16:
        pw, attend = pointwise_native(torch.bfloat16).lib, native_bf16_attention().lib
        return _KernelsBF16(_addr(pw.pdbox_add_rmsnorm), _addr(pw32.pdbox_add_rmsnorm_f32),
                            _addr(quant.pdbox_quant_linear), _addr(pw.pdbox_rotary), _addr(pw.pdbox_store_kv),
                            _addr(attend.pdbox_flash_decode), _addr(pw.pdbox_silu_and_mul))
    return _Kernels(_addr(pw32.pdbox_add_rmsnorm_f32), _addr(quant.pdbox_quant_linear), _addr(pw32.pdbox_rotary_f32),
                    _addr(pw32.pdbox_store_kv_f32), _addr(native_f32().lib.pdbox_decode_f32))


@cache
def _layer_fn(dtype: torch.dtype) -> Callable[..., int]:
    name = f"decode_layer_{_SUFFIX[dtype]}"
    return getattr(native(dtype).required(f"the fused {_NAME[dtype]} decode layer"), f"pdbox_{name}")


def _qweight(name: str, w: Q4Weight | Q8Weight, shape: tuple[int, int]) -> _QWeight:
    if not isinstance(w, (Q4Weight, Q8Weight)) or w.shape != shape:
        raise ValueError(f"{name} must be a quantized weight of shape {shape}, got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    params = w.params if isinstance(w, Q4Weight) else w.scales
    return _QWeight(w.codes.data_ptr(), params.data_ptr(), 4 if isinstance(w, Q4Weight) else 8, shape[0], shape[1])


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None,
           dtype: torch.dtype = torch.float32) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() or (shape and t.shape != shape):
        raise ValueError(f"{name} must be a contiguous {_NAME.get(dtype, dtype)} CPU tensor"
                         f"{f' of shape {shape}' if shape else ''}, got {t.dtype} {tuple(t.shape)} on {t.device}")


@dataclass(frozen=True)
class DecodeLayer:
    """A layer's step-invariant part, checked: ``struct`` points into ``keep`` (held alive here)."""

    struct: _Layer
    keep: tuple[object, ...]
    hidden: int
    num_pages: int
    page_size: int
    positions: int  # rows of the rotary table
    dtype: torch.dtype  # the caches' and the rows' between layers: fp32, or bf16 (the residual stays fp32)

    @staticmethod
    def build(input_norm: torch.Tensor, post_norm: torch.Tensor, qkv: Q4Weight | Q8Weight, o: Q4Weight | Q8Weight,
              gate_up: Q4Weight | Q8Weight, down: Q4Weight | Q8Weight, cos_sin: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, num_q_heads: int, eps: float, scale: float) -> DecodeLayer:
        """``ValueError`` names what the kernels cannot take: weights of other shapes, caches that are not
        equal contiguous fp32 or bf16 ``(pages, page_size, kv_heads, head_dim)`` (their dtype is the layer's),
        and so on."""
        if k_cache.dtype not in DTYPES:
            raise ValueError(f"k_cache must be a contiguous fp32 or bf16 CPU tensor, got {k_cache.dtype}")
        dtype = k_cache.dtype
        _check("k_cache", k_cache, dtype=dtype)
        if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
            raise ValueError(f"the caches must be equal (pages, page_size, kv_heads, head_dim), got "
                             f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
        _check("v_cache", v_cache, dtype=dtype)
        pages, page_size, hkv, d = k_cache.shape
        hq, hidden = num_q_heads, input_norm.shape[0] if input_norm.dim() == 1 else -1
        head = 64 if dtype == torch.bfloat16 else 32  # pdbox_flash_decode's multiple; decode_f32.c's
        if page_size & (page_size - 1) or d % head or d > MAX_HEAD_DIM or hq % hkv or hq // hkv > MAX_GROUP:
            raise ValueError(f"the kernels take power-of-two pages, head_dim a multiple of {head} up to "
                             f"{MAX_HEAD_DIM} and up to {MAX_GROUP} query heads a KV head; got pages of {page_size}, "
                             f"head_dim {d}, {hq} over {hkv}")
        if hidden < 16 or hidden % 16:
            raise ValueError(f"the hidden size must be a multiple of 16, got {hidden}")
        _check("input_norm", input_norm, (hidden,))
        _check("post_norm", post_norm, (hidden,))
        _check("cos_sin", cos_sin)
        if cos_sin.dim() != 2 or cos_sin.shape[1] != d:
            raise ValueError(f"cos_sin must be (positions, {d}), got {tuple(cos_sin.shape)}")
        inter = down.shape[1]
        if inter % 32:
            raise ValueError(f"the intermediate size must be a multiple of 32, got {inter}")
        layer = _Layer(hidden, hq, hkv, d, inter, page_size, eps, scale, input_norm.data_ptr(), post_norm.data_ptr(),
                       _qweight("qkv", qkv, ((hq + 2 * hkv) * d, hidden)), _qweight("o", o, (hidden, hq * d)),
                       _qweight("gate_up", gate_up, (2 * inter, hidden)), _qweight("down", down, (hidden, inter)),
                       cos_sin.data_ptr(), cos_sin.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                       k_cache.stride(0), pages * page_size)
        keep = (input_norm, post_norm, qkv, o, gate_up, down, cos_sin, k_cache, v_cache)
        return DecodeLayer(layer, keep, hidden, pages, page_size, cos_sin.shape[0], dtype)


@dataclass(frozen=True)
class DecodeStep:
    """A step's rows, checked against the layers' caches and rotary table."""

    struct: _Step
    keep: tuple[object, ...]
    rows: int
    num_pages: int
    page_size: int
    positions: int  # one past the largest position

    @staticmethod
    def build(layer: DecodeLayer, positions: torch.Tensor, slot_mapping: torch.Tensor, plan: DecodeTable) -> DecodeStep:
        rows = plan.lens.numel()
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"a fused decode step takes 1 to {MAX_ROWS} rows, got {rows}")
        for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
            if t.dtype != torch.int64 or t.shape != (rows,) or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous int64 ({rows},), got {t.dtype} {tuple(t.shape)}")
        if (plan.num_pages, plan.page_size) != (layer.num_pages, layer.page_size):
            raise ValueError(f"the page table was checked for {plan.num_pages} pages of {plan.page_size}; the "
                             f"caches hold {layer.num_pages} of {layer.page_size}")
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= layer.positions:
            raise ValueError(f"positions must lie in [0, {layer.positions})")
        step = _Step(rows, positions.data_ptr(), slot_mapping.data_ptr(), plan.table.data_ptr(), plan.lens.data_ptr(),
                     plan.table.stride(0))
        return DecodeStep(step, (positions, slot_mapping, plan), rows, plan.num_pages, plan.page_size, high + 1)


def decode_layer(layer: DecodeLayer, step: DecodeStep, x: torch.Tensor | None, residual: torch.Tensor,
                 threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer on ``x`` (the previous layer's output, ``(rows, hidden)`` in the layer's dtype; ``None`` for
    the first layer, whose input is ``residual`` alone, the fp32 embeddings): ``(its output, in the layer's
    dtype; the fp32 residual stream after its attention)``. The residual is updated in place when ``x`` is
    given, else made new."""
    if (step.num_pages, step.page_size) != (layer.num_pages, layer.page_size) or step.positions > layer.positions:
        raise ValueError(f"the step was checked for {step.num_pages} pages of {step.page_size} and positions below "
                         f"{step.positions}; this layer has {layer.num_pages} of {layer.page_size} and "
                         f"{layer.positions} positions")
    shape, dtype = (step.rows, layer.hidden), layer.dtype
    for name, t, want in (("x", x, dtype), ("residual", residual, torch.float32)):  # the cheap test first: once a layer
        if t is not None and not (t.dtype == want and t.is_cpu and t.shape == shape and t.is_contiguous()):
            _check(name, t, shape, want)
    out = torch.empty(shape, dtype=dtype)
    res_out = residual if x is not None else torch.empty(shape)
    rc = _layer_fn(dtype)(ctypes.addressof(_kernels(dtype)), ctypes.addressof(layer.struct),
                          ctypes.addressof(step.struct),
                     None if x is None else x.data_ptr(), residual.data_ptr(), res_out.data_ptr(), out.data_ptr(),
                     max(1, threads))
    if rc:
        what = STEPS[rc // 100] if rc // 100 < len(STEPS) else f"code {rc}"
        gemv = rc // 100 in [STEPS.index(s) for s in STEPS if s.endswith("projection")]
        if rc == 100 * STEPS.index("scratch memory") or (gemv and rc % 100 == 2):  # the GEMV's -2: its scratch
            raise MemoryError(f"the fused decode layer could not allocate its scratch memory (in {what})")
        if rc == 100 * STEPS.index("the KV store") + 2:  # pdbox_store_kv(_f32)'s -2: nothing written
            raise ValueError("a slot lies outside the KV cache")
        raise RuntimeError(f"the fused decode layer failed in {what} (code {rc})")
    return out, res_out

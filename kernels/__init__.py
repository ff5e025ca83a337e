"""Kernels of the engine's forward pass, each a Triton kernel beside its pure-torch reference.

The ``*_ref`` functions are the CPU path and the ground truth; the unsuffixed names are the Triton
versions with the same signature (plus optional precomputed metadata), which validate their inputs
and raise ``ValueError`` on bad shapes, dtypes, strides or devices. Importing this package never
needs triton or a GPU; calling a Triton wrapper needs CUDA tensors, or ``TRITON_INTERPRET=1`` for CPU
tensors.
"""

from __future__ import annotations

from kernels._triton import HAS_TRITON, interpreter_enabled
from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.decode_attention import decode_attention, decode_attention_ref, default_num_splits
from kernels.extend_attention import extend_attention, extend_attention_ref
from kernels.gemv import gemv, gemv_ref, rmsnorm_gemv, rmsnorm_gemv_ref
from kernels.kv_store import store_kv, store_kv_ref
from kernels.norm import fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from kernels.page_copy import RowSlice, copy_pages, copy_pages_ref
from kernels.rotary import rotary, rotary_cos_sin_cache, rotary_ref, rotary_store_kv, rotary_store_kv_ref

__all__ = [
    "HAS_TRITON",
    "RowSlice",
    "copy_pages",
    "copy_pages_ref",
    "decode_attention",
    "decode_attention_ref",
    "default_num_splits",
    "extend_attention",
    "extend_attention_ref",
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_ref",
    "gemv",
    "gemv_ref",
    "interpreter_enabled",
    "rmsnorm",
    "rmsnorm_gemv",
    "rmsnorm_gemv_ref",
    "rmsnorm_ref",
    "rotary",
    "rotary_cos_sin_cache",
    "rotary_ref",
    "rotary_store_kv",
    "rotary_store_kv_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kv",
    "store_kv_ref",
]

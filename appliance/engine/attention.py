"""Attention backends: the seam between the model and its kernels (paged KV, norms, linear layers).

``torch`` runs the pure-torch references (obviously right, the tests' oracle); ``cpu`` runs the same
functions built for speed on CPUs (``attention_cpu``); ``triton`` runs the Triton kernels (the CUDA
path). ``auto`` picks triton on CUDA and cpu elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from appliance.model.q4_blocks import Q4Blocks
from appliance.model.q8_blocks import Q8Blocks
from kernels.activation import silu_and_mul_ref
from kernels.decode_attention import DecodePlan, decode_attention_ref, decode_plan
from kernels.extend_attention import extend_attention_ref
from kernels.kv_store import store_kv_ref
from kernels.norm import fused_add_rmsnorm_ref, rmsnorm_ref
from kernels.rotary import rotary_ref


@dataclass(frozen=True)
class PlainLayer:
    """A decoder layer with nothing but its two RMSNorms and four linear layers (no biases, no q/k norms,
    SwiGLU), with its rotary table and this engine's KV cache: what a backend's one-call decode layer
    (``decode_layers``, where it has one) takes. The linear weights are in the form ``pack_linear`` made."""

    input_norm: torch.Tensor
    qkv: Any
    o_proj: Any
    post_norm: torch.Tensor
    gate_up: Any
    down: Any
    cos_sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_q_heads: int
    eps: float
    scale: float


class AttentionBackend(Protocol):
    """Kernels the model calls; each mirrors the reference of the same name in ``kernels``."""

    name: str

    def pack_linear(self, weight: torch.Tensor, blocks: Q4Blocks | Q8Blocks | None = None) -> Any:
        """A ``(out, in)`` weight in the form :meth:`linear` takes (called once, at load); ``blocks``, the
        same weight's quantized GGUF blocks where the file has them, for a backend that can run those."""
        ...

    def linear(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias`` in the weight's dtype."""
        ...

    def store_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               page_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
               softcap: float = 0.0) -> torch.Tensor:
        """``softcap`` > 0: attention scores become ``softcap * tanh(scores / softcap)`` (Gemma 2)."""
        ...

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               page_table: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
               scale: float, softcap: float = 0.0, *, extend_start: torch.Tensor | None = None,
               max_extend: int | None = None) -> torch.Tensor:
        """``extend_start``/``max_extend``: each request's first packed row and the longest extend, when
        the caller knows them on the host (`ForwardBatch`); a backend may use them or derive its own."""
        ...

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def fused_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``out_dtype``: the normed rows' dtype when the next linear layer takes another (see
        `kernels.fused_add_rmsnorm_ref`); the residual keeps the promoted dtype."""
        ...

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
        """`rotary` of q and k, then `store_kv` of the rotated k and v; returns the rotated q (see
        `rotary_then_store`; the Triton backend does both in one kernel)."""
        ...

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor: ...

    def silu_mul_linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        """The SwiGLU MLP's down projection: ``linear(silu_and_mul(x), weight)``, fused where a backend can."""
        ...

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: Any, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear layer after a block's RMSNorm: ``(linear(rmsnorm(h), weight, bias), h)`` with ``h = x +
        residual`` (``x`` itself when ``residual`` is None), one kernel where a backend can; else
        `norm_then_linear` (``out_dtype`` as in :meth:`fused_add_rmsnorm`)."""
        ...


def rotary_then_store(be: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`AttentionBackend.rotary_store_kv` as the backend's own two calls."""
    q, k = be.rotary(q, k, positions, cos_sin_cache)
    be.store_kv(k_cache, v_cache, k, v, slot_mapping)
    return q


def norm_then_linear(be: AttentionBackend, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                     eps: float, weight: Any, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`AttentionBackend.norm_linear` as the backend's own calls: the (fused residual-add) RMSNorm, then
    the linear layer."""
    if residual is None:
        return be.linear(be.rmsnorm(x, norm_weight, eps), weight, bias), x
    h, residual = be.fused_add_rmsnorm(x, residual, norm_weight, eps, out_dtype)
    return be.linear(h, weight, bias), residual


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with ``x`` cast to the weight's dtype: the reference linear layer."""
    return F.linear(x.to(weight.dtype), weight, bias)


def keep_weight(weight: torch.Tensor, blocks: Q4Blocks | Q8Blocks | None = None) -> torch.Tensor:
    return weight


class TorchAttentionBackend:
    """The pure-torch references from ``kernels``: runs anywhere, the tests' oracle."""

    name = "torch"
    store_kv = staticmethod(store_kv_ref)
    pack_linear = staticmethod(keep_weight)
    linear = staticmethod(plain_linear)

    def __init__(self) -> None:
        self._plan_key: tuple[torch.Tensor, torch.Tensor] | None = None
        self._plan: DecodePlan = []

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
        # Every layer of a forward pass sees the same page table and lengths: group them once.
        # NOTE: the key holds the tensors themselves (identity, not id()), so a new batch never matches.
        key = self._plan_key
        if key is None or key[0] is not page_table or key[1] is not seq_lens:
            self._plan = decode_plan(page_table, seq_lens, k_cache.shape[1])
            self._plan_key = (page_table, seq_lens)
        return decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, scale, self._plan, softcap)

    @staticmethod
    def extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
               prefix_lens: torch.Tensor, extend_lens: torch.Tensor, scale: float, softcap: float = 0.0, *,
               extend_start: torch.Tensor | None = None, max_extend: int | None = None) -> torch.Tensor:
        return extend_attention_ref(q, k_cache, v_cache, page_table, prefix_lens, extend_lens, scale, softcap)
    rmsnorm = staticmethod(rmsnorm_ref)
    fused_add_rmsnorm = staticmethod(fused_add_rmsnorm_ref)
    rotary = staticmethod(rotary_ref)
    rotary_store_kv = rotary_then_store
    norm_linear = norm_then_linear
    silu_and_mul = staticmethod(silu_and_mul_ref)

    @staticmethod
    def silu_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return plain_linear(silu_and_mul_ref(x), weight)

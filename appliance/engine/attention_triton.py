"""The ``triton`` attention backend: the Triton kernels of ``kernels`` behind the backend interface.

Every method mirrors the torch reference of the same name (see ``appliance.engine.attention``); the
wrappers validate their inputs and raise ``ValueError``. Needs CUDA tensors, or ``TRITON_INTERPRET=1``
for CPU tensors (slow: tests only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from appliance.engine.attention import keep_weight, norm_then_linear, plain_linear
from appliance.engine.linear_choice import stand_in
from kernels.activation import silu_and_mul
from kernels.decode_attention import decode_attention
from kernels.extend_attention import extend_attention
from kernels.gemv import MAX_ROWS, gemv, rmsnorm_gemv
from kernels.kv_store import store_kv
from kernels.norm import fused_add_rmsnorm, rmsnorm
from kernels.rotary import rotary, rotary_store_kv


@contextlib.contextmanager
def decode_splits(backend: object, count: int) -> Iterator[None]:
    """Decode attention cuts each context in ``count`` inside the block (a CUDA graph's bucket, an eager
    step's longest context), then as before; a backend without the knob (the torch references) splits nothing."""
    if not hasattr(backend, "decode_splits"):
        yield
        return
    before = backend.decode_splits
    backend.decode_splits = count
    try:
        yield
    finally:
        backend.decode_splits = before


class TritonAttentionBackend:
    """Triton kernels for the model's forward pass (the CUDA path)."""

    name = "triton"
    pack_linear = staticmethod(keep_weight)

    def __init__(self) -> None:
        # (N, K, rows) of the linear layers that run on `kernels.gemv`: measured at start-up, where it
        # beat cuBLAS (`appliance.engine.linear_choice`); empty (all cuBLAS) until then. The MLP's down
        # projection has its own set: there the GEMV also takes over the SiLU-and-mul kernel before it.
        self.gemv_for: frozenset[tuple[int, int, int]] = frozenset()
        self.gemv_silu_mul_for: frozenset[tuple[int, int, int]] = frozenset()
        # ... and the linear layers after a block's RMSNorm (QKV, gate/up) theirs: where the GEMV that
        # computes the residual add and the norm itself beat the norm's kernel and the layer after it.
        self.gemv_norm_for: frozenset[tuple[int, int, int]] = frozenset()
        # Each row count's timed stand-in (`linear_choice.stand_in`): an eager step of 5 rows follows the
        # choice made at 8. Without timed rows (`gemv_rows` unset) only the sets' own row counts match.
        self._stand_in: dict[int, int | None] = {}
        # Decode attention's split count: None picks it from the shapes; CUDA-graph decode fixes it
        # per captured bucket (appliance.engine.decode_graphs). Any count runs one of two compiles.
        self.decode_splits: int | None = None
        # NOTE: every layer of one forward pass gets the same ``extend_lens`` tensor; its host-side
        # metadata (start offsets, max length) is computed once and reused while the tensor is
        # unchanged (same object, same in-place version), saving a device sync per layer.
        self._extend_key: tuple[int, int, int] | None = None
        self._extend_lens: torch.Tensor | None = None
        self._extend_meta: tuple[torch.Tensor, int] | None = None

    @property
    def gemv_rows(self) -> tuple[int, ...]:
        """The row counts the sets were timed at (`Runner.choose_linears`)."""
        return tuple(m for m, s in self._stand_in.items() if s == m)

    @gemv_rows.setter
    def gemv_rows(self, rows: tuple[int, ...]) -> None:
        self._stand_in = {m: stand_in(m, rows) for m in range(1, MAX_ROWS + 1)} if rows else {}

    def _chosen(self, shapes: frozenset[tuple[int, int, int]], x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether ``x @ weight.T`` runs on the GEMV: unit-stride rows, a shape measured faster there at
        the row count or at its stand-in."""
        if not shapes or x.dim() != 2 or not 0 < x.shape[0] <= MAX_ROWS or x.stride(1) != 1:
            return False
        m = x.shape[0]
        rows = self._stand_in.get(m, m) if self._stand_in else m
        return rows is not None and (weight.shape[0], weight.shape[1], rows) in shapes

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._chosen(self.gemv_for, x, weight):
            return gemv(x, weight, bias)
        return plain_linear(x, weight, bias)

    def silu_mul_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._chosen(self.gemv_silu_mul_for, x, weight):
            return gemv(x, weight, silu_mul=True)
        return self.linear(silu_and_mul(x), weight)

    def norm_linear(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if (self._chosen(self.gemv_norm_for, x, weight) and weight.dtype != torch.float16
                and norm_weight.shape == (x.shape[1],) and norm_weight.is_contiguous()
                and (bias is None or bias.is_contiguous())
                and (residual is None or (residual.shape == x.shape and residual.stride(-1) == 1))):
            return rmsnorm_gemv(x, norm_weight, eps, weight, bias, residual)
        return norm_then_linear(self, x, residual, norm_weight, eps, weight, bias, out_dtype)

    def store_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        store_kv(k_cache, v_cache, k, v, slot_mapping)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
        return decode_attention(q, k_cache, v_cache, page_table, seq_lens, scale, num_splits=self.decode_splits,
                                softcap=softcap)

    def extend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
               prefix_lens: torch.Tensor, extend_lens: torch.Tensor, scale: float,
               softcap: float = 0.0, *, extend_start: torch.Tensor | None = None,
               max_extend: int | None = None) -> torch.Tensor:
        if extend_start is not None and max_extend is not None:  # from the host: no device read
            start_loc, max_len = extend_start, max_extend
        else:
            start_loc, max_len = self._metadata(q, extend_lens)
        return extend_attention(q, k_cache, v_cache, page_table, prefix_lens, extend_lens, scale,
                                extend_start_loc=start_loc, max_extend_len=max_len, softcap=softcap)

    def _metadata(self, q: torch.Tensor, extend_lens: torch.Tensor) -> tuple[torch.Tensor, int]:
        key = (id(extend_lens), extend_lens.data_ptr(), extend_lens._version)
        if self._extend_lens is not extend_lens or self._extend_key != key or self._extend_meta is None:
            lens = extend_lens.cpu()
            total = int(lens.sum())
            if total != q.shape[0]:
                raise ValueError(f"extend: extend_lens sum to {total} but q has {q.shape[0]} tokens")
            start_loc = torch.cumsum(extend_lens, 0) - extend_lens
            self._extend_meta = (start_loc, int(lens.max()) if lens.numel() else 0)
            self._extend_lens, self._extend_key = extend_lens, key
        return self._extend_meta

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rmsnorm(x, weight, eps)

    def fused_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_add_rmsnorm(x, residual, weight, eps, out_dtype)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(q, k, positions, cos_sin_cache)

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
        return rotary_store_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)


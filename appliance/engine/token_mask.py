"""The allowed-token mask of a step's constrained rows, and its application to the logits.

llguidance writes one bit per token (int32 words, bit ``t % 32`` of word ``t // 32``) on the host;
:meth:`TokenMask.apply` moves those few KB to the logits' device and expands them there into an
additive bias (0 allowed, ``-inf`` not) by looking each byte up in a 256 x 8 table, so the same code
masks CPU logits (the host sampler) and CUDA logits (the device sampler) with no sync. An add is
several times cheaper than ``masked_fill`` with a vocabulary-wide bool mask on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from appliance.engine.host_copy import to_device

MAX_MASK_THREADS = 8
_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(256, 8)``: entry ``[b, j]`` is 0 when bit ``j`` of byte ``b`` is set, else ``-inf``."""
    key = (device, dtype)
    if key not in _TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _TABLES[key] = to_device(torch.where(bits.bool(), 0.0, float("-inf")), device, dtype)
    return _TABLES[key]


@dataclass(frozen=True)
class TokenMask:
    """``rows``: the constrained rows of the batch; ``bitmask``: ``(len(rows), words)`` int32 on the host.

    A row that allows nothing (a matcher in error) is treated as allowing everything, so sampling
    never draws from an all-``-inf`` row."""

    rows: tuple[int, ...]
    bitmask: torch.Tensor

    def bias(self, vocab: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(len(rows), vocab)``: 0 for an allowed token, ``-inf`` for the others."""
        words = self.bitmask.clone()
        words[(words == 0).all(dim=-1)] = -1  # host side, a few KB
        device = torch.device(device)
        raw = to_device(words.contiguous().view(torch.uint8), device)  # little-endian: byte t // 8
        bias = _byte_table(device, dtype).index_select(0, raw.flatten().long()).view(len(self.rows), -1)
        if bias.shape[1] < vocab:  # tokens past llguidance's vocabulary: never allowed
            bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[1]), value=float("-inf"))
        return bias[:, :vocab]

    def allowed(self, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(len(rows), vocab)`` bool (for inspection and tests; sampling uses :meth:`bias`)."""
        return self.bias(vocab, device) == 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` ``(B, V)`` with the disallowed tokens of the masked rows at ``-inf``."""
        bias = self.bias(logits.shape[-1], logits.device, logits.dtype)
        if len(self.rows) == logits.shape[0]:
            return logits + bias
        idx = to_device(self.rows, logits.device, torch.int64)
        return logits.index_add(0, idx, bias)


class MaskBuilder:
    """Fills the bitmasks of a batch's matchers, in parallel on this worker's cores (llguidance threads)."""

    def __init__(self, words: int) -> None:
        self.words = words
        self._executor: Any = None

    def build(self, matchers: Sequence[Any]) -> TokenMask | None:
        """``matchers``: one per batch row, None for an unconstrained row. None when no row is constrained."""
        rows = tuple(i for i, m in enumerate(matchers) if m is not None)
        if not rows:
            return None
        bitmask = torch.full((len(rows), self.words), -1, dtype=torch.int32)
        if len(rows) == 1:
            matchers[rows[0]].unsafe_compute_mask_ptr(bitmask.data_ptr(), self.words * 4)
        else:
            self.executor.unsafe_compute_mask_ptr([(matchers[i], j) for j, i in enumerate(rows)],
                                                  bitmask.data_ptr(), self.words * 4, len(rows))
        return TokenMask(rows, bitmask)

    @property
    def executor(self) -> Any:
        if self._executor is None:
            import llguidance

            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            self._executor = llguidance.LLExecutor(num_threads=max(1, min(MAX_MASK_THREADS, cores)))
        return self._executor

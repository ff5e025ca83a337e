"""The one object a forward pass needs besides the weights and the KV tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# tokens, requests, page-table width, logit rows, decode_only, the longest extend, the longest context, 0 (so the
# fields after it start 16-byte aligned; see `_even`)
HEADER_LEN = 8


def _even(n: int) -> int:
    """A field's length in the flat layout: padded to an even count of int64s, so every field's view starts
    16-byte aligned. Triton specializes a pointer argument on 16-byte alignment: views at offsets that
    follow the step's token count would compile the prefill kernels afresh while serving."""
    return n + (n & 1)


def _sizes(header: list[int]) -> list[int]:
    t, b, w, n_logits = header[:4]
    return [t, t, t, b * w, b, b, b, n_logits, b]


@dataclass
class ForwardBatch:
    """A step's tokens, packed back to back in request order.

    Request ``b`` contributes ``extend_lens[b]`` tokens at positions ``prefix_lens[b] + i``; after
    the step its context length is ``seq_lens[b] = prefix_lens[b] + extend_lens[b]``. Token ``t``
    writes its K/V into slot ``slot_mapping[t]`` (``page * page_size + offset``). ``logit_rows`` are
    the packed-token rows whose logits are wanted (the last token of requests that sample).
    ``extend_start``/``max_extend``/``max_seq``, where the builder knew them: each request's first row in the
    packed tokens, the longest extend and the longest context, so attention needs no device-to-host read
    for them.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    page_table: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    seq_lens: torch.Tensor
    logit_rows: torch.Tensor
    decode_only: bool
    extend_start: torch.Tensor | None = None
    max_extend: int | None = None
    max_seq: int | None = None
    packed: torch.Tensor | None = None  # the one int64 tensor every field above views (see `build`)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    @staticmethod
    def flat_values(ids: list[int], positions: list[int], slots: list[int], table: list[list[int]],
                    prefix: list[int], extend: list[int], logit_rows: list[int], decode_only: bool) -> list[int]:
        """A step's metadata as the flat int64 layout `from_flat` reads: a header, then every field."""
        b = len(prefix)
        width = len(table[0]) if table else 0
        seq = [p + e for p, e in zip(prefix, extend)]
        start, at = [], 0
        for e in extend:
            start.append(at)
            at += e
        out = [len(ids), b, width, len(logit_rows), int(decode_only), max(extend, default=0), max(seq, default=0), 0]
        for field in (ids, positions, slots, [p for row in table for p in row], prefix, extend, seq, logit_rows, start):
            out += field
            if len(field) & 1:
                out.append(0)
        return out

    @classmethod
    def from_flat(cls, flat: torch.Tensor, header: list[int]) -> ForwardBatch:
        """Views of ``flat`` (int64, laid out by `flat_values`) given its header, known on the host."""
        b, w, decode_only, max_extend, max_seq = header[1], header[2], header[4], header[5], header[6]
        sizes = _sizes(header)
        chunks = [c[:n] for c, n in zip(flat[HEADER_LEN:].split([_even(n) for n in sizes]), sizes)]
        return cls(
            input_ids=chunks[0], positions=chunks[1], slot_mapping=chunks[2],
            page_table=chunks[3].view(b, w), prefix_lens=chunks[4], extend_lens=chunks[5],
            seq_lens=chunks[6], logit_rows=chunks[7], decode_only=bool(decode_only),
            extend_start=chunks[8], max_extend=None if max_extend < 0 else max_extend,
            max_seq=None if max_seq < 0 else max_seq, packed=flat,
        )

    # NOTE: tensor-parallel ranks receive the batch as ONE int64 tensor (no pickle on any wire).
    def pack(self) -> torch.Tensor:
        """The batch as one int64 tensor on its device: the buffer it was built from, or a new one."""
        if self.packed is not None:
            return self.packed
        dev = self.input_ids.device
        b, t = self.batch_size, self.num_tokens
        start = self.extend_start
        if start is None:
            start = torch.cumsum(self.extend_lens, 0) - self.extend_lens
        longest = -1 if self.max_extend is None else self.max_extend  # -1: unknown (read no device value here)
        context = -1 if self.max_seq is None else self.max_seq
        header = torch.tensor(
            [t, b, int(self.page_table.shape[1]), int(self.logit_rows.shape[0]), int(self.decode_only), longest,
             context, 0],
            dtype=torch.int64, device=dev,  # NOTE: one device for the cat (CUDA under NCCL)
        )
        parts = [header]
        for p in (self.input_ids, self.positions, self.slot_mapping, self.page_table.flatten(), self.prefix_lens,
                  self.extend_lens, self.seq_lens, self.logit_rows, start):
            parts.append(p.to(torch.int64))
            if p.numel() & 1:
                parts.append(header.new_zeros(1))
        return torch.cat(parts)

    @classmethod
    def unpack(cls, flat: torch.Tensor) -> ForwardBatch:
        """`pack`'s inverse (the header is read back to the host: TP followers only)."""
        return cls.from_flat(flat, [int(x) for x in flat[:HEADER_LEN].tolist()])

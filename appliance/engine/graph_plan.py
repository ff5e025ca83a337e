"""CUDA-graph planning for decode: the batch-size ladder, padding, split counts, metadata layout.

Pure host logic (tested on CPU); :mod:`appliance.engine.decode_graphs` captures and replays.

Every captured graph reads its step metadata from one flat int64 device buffer laid out for its
bucket ``B`` as ``[ids B | positions B | slots B | seq_lens B | page table width x B]`` from offset 0,
the table column-major (entry ``j`` of every row together), so a step is ONE host-to-device copy of
``4B + B*k`` values from a pinned buffer of the same layout, ``k`` the most pages a real row of the
step reaches: the table's width follows ``max_model_len``, the copy only the contexts in flight (a
128K-token limit with 1K-token contexts: 64 columns of 8192). Padded rows (``n <= row < B``) feed
token 0 at position 0 into a scratch slot with ``seq_len`` 0: attention reads nothing for them and their
logits are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.decode_attention import num_splits_for

LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_ladder(max_running: int, ladder: Sequence[int] = LADDER) -> tuple[int, ...]:
    """The captured batch sizes: the ladder up to ``max_running``, which is itself the top bucket
    when it falls between rungs (it is never exceeded) or the last rung when it lies beyond."""
    if max_running < 1:
        raise ValueError(f"max_running must be >= 1, got {max_running}")
    out = [b for b in ladder if b < max_running]
    out.append(min(max_running, max(ladder)))
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class GraphPlan:
    """What start-up captures: ``buckets`` (ascending), each with its fixed decode ``num_splits``,
    over a page table ``width`` pages wide (the longest context any request may reach)."""

    buckets: tuple[int, ...]
    num_splits: tuple[int, ...]
    width: int
    page_size: int

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be distinct ascending sizes >= 1, got {self.buckets}")
        if len(self.num_splits) != len(self.buckets):
            raise ValueError("one num_splits per bucket")
        if self.width < 1 or self.page_size < 1:
            raise ValueError(f"width and page_size must be >= 1, got {self.width}, {self.page_size}")

    @property
    def max_bucket(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket holding ``n`` requests; None beyond the ladder (eager fallback)."""
        if n < 1:
            raise ValueError(f"a decode step has at least one request, got {n}")
        return next((b for b in self.buckets if b >= n), None)

    def splits_for(self, bucket: int) -> int:
        return self.num_splits[self.buckets.index(bucket)]

    def meta_len(self, bucket: int) -> int:
        """int64 values of a ``bucket`` step's layout (a step copies a prefix of it, `fill_meta`)."""
        return bucket * (4 + self.width)

    @property
    def buffer_len(self) -> int:
        return self.meta_len(self.max_bucket)


def plan_graphs(max_running: int, max_model_len: int, page_size: int, kv_heads: int, sms: int,
                ladder: Sequence[int] = LADDER) -> GraphPlan:
    """The plan for an engine: buckets up to ``max_running``, a page table wide enough for
    ``max_model_len`` tokens, and per bucket the split count the eager kernel would pick at that width
    (rounded down to a power of two)."""
    if max_model_len < 1 or kv_heads < 1 or sms < 1:
        raise ValueError(f"max_model_len, kv_heads and sms must be >= 1, got {max_model_len}, {kv_heads}, {sms}")
    buckets = bucket_ladder(max_running, ladder)
    width = -(-max_model_len // page_size)
    splits = tuple(num_splits_for(b, kv_heads, width * page_size, sms) for b in buckets)
    return GraphPlan(buckets, splits, width, page_size)


@dataclass(frozen=True)
class DecodeRow:
    """One request of a decode step: the token it feeds, where, and its pages."""

    token: int
    position: int
    pages: Sequence[int]


class TableMemo:
    """What each page-table row of one bucket's layout in a metadata buffer holds: the pages list it
    was copied from and how many of its entries. A request's ``pages`` list only ever grows in place
    (the scheduler extends it; release and admission rebind it, see ``Request.pages``), so a row that
    holds the same list object needs only its new entries: at long contexts the whole table was most
    of a step's host time (64 rows of 8K tokens: ~1.1 ms). Another bucket's fill overwrites this
    layout (each bucket's table starts at its own offset), so the memo follows one bucket at a time."""

    def __init__(self) -> None:
        self.bucket: int | None = None
        self.rows: list[tuple[Sequence[int] | None, int]] = []

    def reset(self) -> None:
        self.bucket, self.rows = None, []


def fill_meta(buf: torch.Tensor, plan: GraphPlan, bucket: int, rows: Sequence[DecodeRow], scratch_slot: int,
              memo: TableMemo | None = None) -> int:
    """Write ``rows`` padded to ``bucket`` into the int64 CPU tensor ``buf`` (the layout above); returns
    how many leading values the step must copy: the four vectors and the table's columns up to the most
    pages a real row needs (a padded row's ``seq_len`` is 0, so its entries are never read). Entries past
    a row's pages are left as they were: the kernel never reads past ``seq_len``. With ``memo`` (which
    only this function may keep, over one buffer that nothing else writes), a row whose pages list it
    already copied gets only the entries appended since."""
    n, w, ps = len(rows), plan.width, plan.page_size
    if not 1 <= n <= bucket:
        raise ValueError(f"{n} requests do not fit bucket {bucket}")
    used = plan.meta_len(bucket)
    if buf.dtype != torch.int64 or buf.dim() != 1 or buf.numel() < used:
        raise ValueError(f"metadata buffer must be 1-D int64 with >= {used} values")
    arr = buf.numpy()  # NOTE: numpy row writes cost ~1 us; torch indexing ~5 us a row, 1.3 ms at B=256
    table = arr[4 * bucket:used].reshape(w, bucket)  # column-major: table[j, i] is row i's page j
    if memo is not None and memo.bucket != bucket:
        memo.bucket, memo.rows = bucket, [(None, 0)] * bucket
    tok_l, pos_l, slot_l, len_l = [], [], [], []
    cols = 0
    for i, r in enumerate(rows):
        need = r.position // ps + 1
        if need > w or len(r.pages) < need:
            raise ValueError(f"row {i}: position {r.position} needs {need} pages (table width {w}, "
                             f"request has {len(r.pages)})")
        tok_l.append(r.token)
        pos_l.append(r.position)
        slot_l.append(r.pages[r.position // ps] * ps + r.position % ps)
        len_l.append(r.position + 1)
        held, done = memo.rows[i] if memo is not None else (None, 0)
        start = done if held is r.pages and done <= need else 0
        if start < need:
            table[start:need, i] = r.pages[start:need]
        cols = max(cols, need)
        if memo is not None:
            memo.rows[i] = (r.pages, need)
    for k, (vals, fill) in enumerate(((tok_l, 0), (pos_l, 0), (slot_l, scratch_slot), (len_l, 0))):
        seg = arr[k * bucket:(k + 1) * bucket]
        seg[:n] = vals
        seg[n:] = fill
    return 4 * bucket + cols * bucket


def meta_views(flat: torch.Tensor, plan: GraphPlan, bucket: int) -> dict[str, torch.Tensor]:
    """The named views of ``flat`` (device or host) that a ``bucket`` step reads."""
    b = bucket
    return {"input_ids": flat[0:b], "positions": flat[b:2 * b], "slot_mapping": flat[2 * b:3 * b],
            "seq_lens": flat[3 * b:4 * b], "page_table": flat[4 * b:plan.meta_len(b)].view(plan.width, b).t()}

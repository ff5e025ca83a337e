"""Decode attention on CPU without copying what already lies in one piece.

A request's context is paged, so batched attention first gathers every page into a contiguous
tensor: a copy of all K/V of the batch per layer and step, which on a CPU costs as much as the
attention itself. Yet most of a context usually lies in one run of consecutive pages (a prompt
prefilled into a fresh or freshly freed stretch of the pool), and a run is a strided view of the
cache: no copy needed.

:func:`split_runs` splits each request into its leading run of consecutive pages (read in place,
one attention call per request) and the rest (the pages that decode added later, gathered for the
whole batch into one call). :func:`decode_by_runs` computes both and merges the two partial
softmaxes by their log-sum-exp; the result equals attention over the whole context.

A fused call per request has a fixed cost, so :func:`decode_way` reads in place only for the
smallest batches and sends larger ones down the gathered, length-batched path of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.decode_attention import DecodePlan, decode_attention_ref, decode_plan

# NOTE: one fused-attention call per request costs ~25 us before it reads a key, and its per-key
# rate is no better than the batched matmuls', so reading in place pays at batch 1 only (2-core Zen 4,
# bf16 and fp32 alike, us a layer, in place vs gathered: batch 1 at 300 tokens 51 vs 157; batch 2
# 105 vs 166 at 300 tokens but 439 vs 350 at 2000 and 1.04x the step at 64; batch 4 at 1K 491 vs 363).
IN_PLACE_MAX_BATCH = 1
MIN_RUN_TOKENS = 64  # a shorter leading run is gathered with the rest: one call more would cost more
DTYPES = (torch.float32, torch.bfloat16)  # what torch's fused CPU attention computes (fp32 accumulation)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`decode_by_runs` takes these: the query and the cache in one dtype of ``DTYPES``."""
    return q.dtype == k_cache.dtype and q.dtype in DTYPES


@dataclass(frozen=True)
class RunSplit:
    """One forward pass's split of every request's context (it depends only on the page table and
    the lengths, so all layers share it)."""

    heads: list[tuple[int, int, int]]  # (request row, first cache slot, tokens) read in place
    head_rows: torch.Tensor  # the requests in ``heads``, in order
    tail_rows: torch.Tensor  # the requests with a gathered rest, in order
    tail_plan: DecodePlan  # decode_plan of the rests; its rows index ``tail_rows``
    tail_masks: list[torch.Tensor]  # per tail group: 0 / -inf past each rest, (n, 1, 1, width)
    both_head: torch.Tensor  # requests with a head and a rest: their index in heads ...
    both_tail: torch.Tensor  # ... and in tail_rows
    both_rows: torch.Tensor  # ... and their request row
    all_in_place: bool = False  # every request is one run read in place, in batch order


def leading_run(pages: list[int]) -> int:
    """How many of ``pages`` from the first on are consecutive page ids."""
    n = 1
    while n < len(pages) and pages[n] == pages[0] + n:
        n += 1
    return n if pages else 0


def split_runs(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
               min_run_tokens: int = MIN_RUN_TOKENS, mask_dtype: torch.dtype = torch.float32) -> RunSplit:
    """Split each request of ``page_table`` ``(batch, max_pages)`` / ``seq_lens`` ``(batch,)``; the
    rests' masks in ``mask_dtype`` (the query's: made once per forward, not once per layer)."""
    lens = seq_lens.tolist()
    table = page_table.tolist()
    heads: list[tuple[int, int, int]] = []
    rests: list[tuple[int, list[int], int]] = []  # (request row, pages, tokens)
    both: list[tuple[int, int, int]] = []
    for b, n in enumerate(lens):
        if n <= 0:
            continue
        pages = table[b][: (n + page_size - 1) // page_size]
        run = leading_run(pages)
        head = min(run * page_size, n) if run * page_size >= min_run_tokens else 0
        if head:
            heads.append((b, pages[0] * page_size, head))
        if head < n:
            if head:
                both.append((len(heads) - 1, len(rests), b))
            rests.append((b, pages[head // page_size :] if head else pages, n - head))
    width = max((len(p) for _, p, _ in rests), default=0)
    rest_table = torch.tensor([p + [0] * (width - len(p)) for _, p, _ in rests], dtype=torch.long)
    rest_table = rest_table.view(len(rests), width)
    rest_lens = torch.tensor([t for _, _, t in rests], dtype=torch.long)
    plan = decode_plan(rest_table, rest_lens, page_size) if rests else []
    masks = [torch.zeros(valid.shape, dtype=mask_dtype).masked_fill_(~valid, float("-inf"))[:, None, None]
             for *_, valid in plan]

    def rows(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return RunSplit(
        heads=heads, head_rows=rows([b for b, _, _ in heads]), tail_rows=rows([b for b, _, _ in rests]),
        tail_plan=plan, tail_masks=masks, both_head=rows([h for h, _, _ in both]),
        both_tail=rows([t for _, t, _ in both]), both_rows=rows([b for _, _, b in both]),
        all_in_place=not rests and len(heads) == len(lens),
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning ``(out, logsumexp)``: ``q`` ``(n, kv_heads, group, D)`` against
    ``k``/``v`` ``(n, kv_heads, length, D)`` (a KV head's query heads are its query rows)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)


def decode_by_runs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, split: RunSplit,
                   scale: float) -> torch.Tensor:
    """Decode attention of ``q`` ``(batch, q_heads, D)`` over caches ``(num_pages, page_size, kv_heads, D)``
    of its dtype (see :func:`supports`), by ``split``; empty requests yield zeros."""
    batch, q_heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    qg = q.view(batch, kv_heads, q_heads // kv_heads, dim)
    head_o, head_lse = _in_place(qg, k_cache, v_cache, split, scale)
    if split.all_in_place:  # nothing to place or merge
        return head_o.reshape(batch, q_heads, dim)
    out = torch.zeros_like(qg)
    tail_o, tail_lse = _gathered(qg, k_cache, v_cache, split, scale)
    out.index_copy_(0, split.head_rows, head_o)
    out.index_copy_(0, split.tail_rows, tail_o)
    if split.both_rows.numel():
        # NOTE: the two partial softmaxes, each normalised over its own keys, weigh by their share of
        # the total exp-sum: w = exp(lse_part - lse_total).
        l1, l2 = head_lse.index_select(0, split.both_head), tail_lse.index_select(0, split.both_tail)
        total = torch.logaddexp(l1, l2)
        merged = (head_o.index_select(0, split.both_head).float() * (l1 - total).exp_().unsqueeze(-1)).add_(
            tail_o.index_select(0, split.both_tail).float() * (l2 - total).exp_().unsqueeze(-1))
        out.index_copy_(0, split.both_rows, merged.to(out.dtype))
    return out.view(batch, q_heads, dim)


def _in_place(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, split: RunSplit,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of each leading run, in ``split.heads`` order, read as views of the cache."""
    if not split.heads:
        return qg[:0], qg.new_empty((0, *qg.shape[1:3]), dtype=torch.float32)
    kv_heads, dim = k_cache.shape[2:]
    k_slots, v_slots = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    parts = [_attend(qg[b : b + 1], k_slots[s : s + n].transpose(0, 1)[None],
                     v_slots[s : s + n].transpose(0, 1)[None], scale) for b, s, n in split.heads]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


def _gathered(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, split: RunSplit,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of each rest, in ``split.tail_rows`` order, its pages gathered per length group."""
    m = int(split.tail_rows.shape[0])
    tail_o, tail_lse = qg.new_empty((m, *qg.shape[1:])), qg.new_empty((m, *qg.shape[1:3]), dtype=torch.float32)
    num_pages, _, kv_heads, dim = k_cache.shape
    k_rows, v_rows = k_cache.view(num_pages, -1), v_cache.view(num_pages, -1)
    for (idx, table, width, _), mask in zip(split.tail_plan, split.tail_masks):
        n = int(idx.shape[0])
        k = k_rows.index_select(0, table).view(n, width, kv_heads, dim).transpose(1, 2)
        v = v_rows.index_select(0, table).view(n, width, kv_heads, dim).transpose(1, 2)
        o, lse = _attend(qg.index_select(0, split.tail_rows.index_select(0, idx)), k, v, scale, mask.to(qg.dtype))
        tail_o.index_copy_(0, idx, o)
        tail_lse.index_copy_(0, idx, lse)
    return tail_o, tail_lse


def decode_way(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
               in_place_dtype: torch.dtype | None) -> RunSplit | DecodePlan:
    """How a decode batch attends: by runs read in place (a few requests, see ``IN_PLACE_MAX_BATCH``;
    ``in_place_dtype`` is the query's, ``None`` where :func:`supports` refuses it) or gathered and
    batched by length (``decode_attention_ref``'s plan)."""
    if in_place_dtype is not None and page_table.shape[0] <= IN_PLACE_MAX_BATCH:
        return split_runs(page_table, seq_lens, page_size, mask_dtype=in_place_dtype)
    return decode_plan(page_table, seq_lens, page_size)


def attend_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                  seq_lens: torch.Tensor, way: RunSplit | DecodePlan, scale: float,
                  softcap: float = 0.0) -> torch.Tensor:
    """Decode attention of ``q`` the way :func:`decode_way` chose (``softcap`` needs the gathered way)."""
    if isinstance(way, RunSplit):
        return decode_by_runs(q, k_cache, v_cache, way, scale)
    return decode_attention_ref(q, k_cache, v_cache, page_table, seq_lens, scale, way, softcap)

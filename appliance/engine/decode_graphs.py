"""Decode steps replayed from CUDA graphs captured at start-up (see :mod:`appliance.engine.graph_plan`).

One graph per bucket of the plan, all reading views of ONE flat int64 device buffer that a step fills
with a single non-blocking copy from a pinned host buffer, and writing fp32 logits into a static
output. Start-up runs every bucket once eagerly first (Triton compiles and autotunes there, with the
bucket's decode split count fixed), then captures largest first so the smaller graphs share its
memory pool. A step that does not fit the ladder runs eagerly elsewhere (the runner's build/forward).

NOTE: the pinned buffer is rewritten by the next step; that is safe because every step's logits are
read on the host (sampled ids) after the copy, in stream order, before the next step starts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from appliance.engine.attention_triton import decode_splits
from appliance.engine.forward_batch import ForwardBatch
from appliance.engine.graph_plan import DecodeRow, GraphPlan, TableMemo, fill_meta, meta_views


class DecodeGraphs:
    """Static-buffer decode for one model and KV pool on one GPU."""

    def __init__(self, model, kv: torch.Tensor, plan: GraphPlan, scratch_page: int, use_graphs: bool = True,
                 warmup_context: int = 1024) -> None:
        self.model, self.kv, self.plan = model, kv, plan
        self.use_graphs = use_graphs
        self.scratch_page = scratch_page
        self.scratch_slot = scratch_page * plan.page_size
        dev = model.device
        self.host = torch.zeros(plan.buffer_len, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.memo = TableMemo()  # what the host buffer's page table holds (fill_meta's alone: reset on other writes)
        self.flat = torch.zeros(plan.buffer_len, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._captured: dict[int, ForwardBatch] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.warmup_context = max(1, min(warmup_context, plan.width * plan.page_size))
        self.warmup_s = 0.0
        self.capture_s = 0.0

    def _batch(self, b: int) -> ForwardBatch:
        v = meta_views(self.flat, self.plan, b)
        dev = self.flat.device
        return ForwardBatch(
            input_ids=v["input_ids"], positions=v["positions"], slot_mapping=v["slot_mapping"],
            page_table=v["page_table"], prefix_lens=torch.zeros(b, dtype=torch.int64, device=dev),
            extend_lens=torch.ones(b, dtype=torch.int64, device=dev), seq_lens=v["seq_lens"],
            logit_rows=torch.arange(b, dtype=torch.int64, device=dev), decode_only=True,
        )

    def _forward(self, b: int, batch: ForwardBatch | None = None) -> torch.Tensor:
        # NOTE: eagerly, a fresh ForwardBatch of the same views each time: the torch backend caches its
        # decode plan by tensor identity, which must not survive new contents.
        with decode_splits(self.model.backend, self.plan.splits_for(b)):
            return self.model.logits(self.model.forward(batch or self._batch(b), self.kv))

    def eager(self, b: int) -> torch.Tensor:
        """Bucket ``b``'s step run eagerly on the static buffers as they are (benches: graph against eager)."""
        return self._forward(b)

    def _fill_warmup(self, b: int) -> None:
        """Every row reads ``warmup_context`` tokens of the scratch page, over and over (realistic
        lengths for the autotuner) and writes only the scratch slot."""
        self.memo.reset()
        v = meta_views(self.host, self.plan, b)
        ctx = self.warmup_context
        v["input_ids"].fill_(0)
        v["positions"].fill_(ctx - 1)
        v["slot_mapping"].fill_(self.scratch_slot)
        v["seq_lens"].fill_(ctx)
        v["page_table"].fill_(self.scratch_page)
        used = self.plan.meta_len(b)
        self.flat[:used].copy_(self.host[:used])

    def capture(self) -> None:
        """Warm every bucket up eagerly (compiles, autotuning), then capture (when graphs are on)."""
        t0 = time.perf_counter()
        for b in reversed(self.plan.buckets):
            self._fill_warmup(b)
            self._forward(b)
        if self.flat.is_cuda:
            torch.cuda.synchronize(self.flat.device)
        t1 = time.perf_counter()
        self.warmup_s = t1 - t0
        if not self.use_graphs:
            return
        pool = None
        for b in reversed(self.plan.buckets):  # largest first: the others reuse its pool
            self._fill_warmup(b)
            graph = torch.cuda.CUDAGraph()
            batch = self._batch(b)  # made outside the capture and kept: the graph reads its tensors
            # NOTE: thread_local: another thread's CUDA calls (a transport's) must not break the capture
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._forward(b, batch)
            pool = graph.pool()
            self.graphs[b], self.outputs[b], self._captured[b] = graph, out, batch
        torch.cuda.synchronize(self.flat.device)
        self.capture_s = time.perf_counter() - t1

    def drop_graphs(self) -> None:
        """Run every bucket eagerly on the static buffers from now on (after a failed capture)."""
        self.use_graphs = False
        self.graphs.clear()
        self.outputs.clear()
        self._captured.clear()
        if self.flat.is_cuda:
            torch.cuda.synchronize(self.flat.device)

    def fits(self, n: int) -> bool:
        return self.plan.bucket_for(n) is not None

    def run(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """fp32 logits ``(len(rows), vocab)`` of one decode step (a view of a static buffer when
        replayed: valid until the next step)."""
        b = self.plan.bucket_for(len(rows))
        if b is None:
            raise ValueError(f"{len(rows)} requests exceed the largest captured bucket {self.plan.max_bucket}")
        used = fill_meta(self.host, self.plan, b, rows, self.scratch_slot, self.memo)
        self.flat[:used].copy_(self.host[:used], non_blocking=True)
        if self.use_graphs:
            self.graphs[b].replay()
            out = self.outputs[b]
        else:
            out = self._forward(b)
        return out[: len(rows)]

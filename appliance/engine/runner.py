"""The model runner: builds a step's ForwardBatch, runs the model on this rank, returns logits."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from appliance.config import EngineConfig, ModelConfig, RankInfo
from appliance.engine import tp
from appliance.engine.attention import plain_linear
from appliance.engine.attention_triton import decode_splits
from appliance.engine.backends import create_backend
from appliance.engine.decode_graphs import DecodeGraphs
from appliance.engine.forward_batch import HEADER_LEN, ForwardBatch
from appliance.engine.graph_plan import LADDER, DecodeRow, plan_graphs
from appliance.engine.host_copy import to_device
from appliance.engine.kv_cache import PagePool
from appliance.engine.linear_choice import LinearTiming, choose_linears, gemv_shapes, norm_rows, summary
from appliance.engine.rank_device import bind_device
from appliance.engine.request import Request
from appliance.engine.scheduler import ScheduledBatch
from appliance.model.llama import LlamaModel
from appliance.model.loader import load_checkpoint
from appliance.model.random_model import is_random_spec, random_checkpoint
from appliance.model.weights import Checkpoint
from kernels._triton import num_sms
from kernels.activation import silu_and_mul
from kernels.decode_attention import num_splits_for
from kernels.gemv import MAX_ROWS, gemv, rmsnorm_gemv
from kernels.norm import fused_add_rmsnorm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TABLE_ALIGN = 16  # an eager step's page table on a GPU is a multiple of this many pages wide


def table_width(longest: int, device: torch.device) -> int:
    """The page-table width of an eager step whose longest request holds ``longest`` pages. On a GPU it
    is rounded up: the table's row stride reaches prefill's extend kernel as an int, which Triton compiles
    apart when it is 1, a multiple of 16 or neither (so a first short or odd-sized prompt compiled while
    serving); decode attention takes its strides unspecialized."""
    return -(-longest // TABLE_ALIGN) * TABLE_ALIGN if device.type == "cuda" else longest


def checkpoint_for(model: str | None, device: torch.device | str, dtype: str) -> Checkpoint:
    """A ``random:NAME`` spec's weights drawn on ``device`` in ``dtype``, or a checkpoint loaded from disk."""
    if is_random_spec(model):
        return random_checkpoint(str(model), device, DTYPES[dtype])
    return load_checkpoint(model)


def pages_for(cfg: EngineConfig, mcfg: ModelConfig, page_size: int) -> int:
    """Pages of the pool: explicit, or from the memory budget (same on every TP rank)."""
    if cfg.num_pages:
        return cfg.num_pages
    heads = -(-mcfg.num_kv_heads // cfg.tp_size)
    return PagePool.pages_for_budget(cfg.kv_cache_mb, mcfg.num_layers, page_size, heads, mcfg.head_dim,
                                     DTYPES[cfg.cache_dtype])


def token_at(req, position: int) -> int:
    """The token a request feeds at ``position`` (prompt, then its output)."""
    n = len(req.prompt_ids)
    return req.prompt_ids[position] if position < n else req.output_ids[position - n]


def decode_rows(sb: ScheduledBatch) -> list[DecodeRow]:
    """A decode-only step's rows (one token each, at its prefix length)."""
    return [DecodeRow(token_at(r, start), start, r.pages) for r, start in zip(sb.requests, sb.prefix_lens)]


class ModelRunner:
    """One TP rank's model and KV pool. Rank 0 drives; other ranks :meth:`follow`."""

    def __init__(self, model: str | None | Checkpoint, cfg: EngineConfig, rank: RankInfo | None = None,
                 kv_allocator=None, tp_store=None, ranks_failed: Callable[[], str | None] | None = None) -> None:
        """``tp_store``: rank 0's rendezvous store, made before its followers started (`tp.master_store`);
        ``ranks_failed``: why a follower cannot join any more (its process exited), asked while rank 0 waits."""
        self.cfg = cfg
        self.rank = rank or RankInfo()
        # each TP rank on its own GPU (bound before NCCL); under gloo they may share one
        self.device = bind_device(cfg.device, self.rank, share_gpu=cfg.tp_backend == "gloo")
        ckpt = model if isinstance(model, Checkpoint) else checkpoint_for(model, self.device, cfg.dtype)
        self._ranks_failed = ranks_failed
        self.checkpoint = ckpt
        self.model_config = ckpt.config
        self.tp_group = tp.init_group(self.rank, self.device, cfg.tp_backend, cfg.tp_timeout_s, store=tp_store,
                                      ranks_failed=ranks_failed) if self.rank.world_size > 1 else None
        # rank 0 pings its followers while idle (from now: they wait for commands while it builds, too)
        self.keepalive = tp.Keepalive(self.tp_group, self.device, min(tp.KEEPALIVE_S, cfg.tp_timeout_s / 6)) \
            if self.tp_group is not None and self.rank.rank == 0 else None
        self.backend = create_backend(cfg.attention_backend, self.device, cfg.native_kernels)
        self.model = LlamaModel(
            ckpt.config, ckpt.weights, self.backend, DTYPES[cfg.dtype], self.device, self.rank,
            all_reduce=tp.all_reduce if self.rank.world_size > 1 else None,
            quant=ckpt.quant if cfg.q4_kernels else None,
        )
        ckpt.weights, ckpt.quant = {}, {}  # the model holds its own (cast, sharded) copies now
        shard = self.model.shard
        num_pages = pages_for(cfg, ckpt.config, cfg.page_size)
        shape = (2, ckpt.config.num_layers, num_pages, cfg.page_size, shard.num_kv_heads, ckpt.config.head_dim)
        dtype = DTYPES[cfg.cache_dtype]
        if kv_allocator is not None:
            kv = kv_allocator(shape, dtype, self.device)
        else:
            kv = torch.zeros(shape, dtype=dtype, device=self.device)
        self.pool = PagePool(kv)
        # Ranks > 0: turns a step's ``extra`` bytes into (layer hook, after-step callback).
        self.follower_hook: Callable[[bytes, torch.Tensor], tuple] | None = None
        # Ranks > 0: take rank 0's list of rooms abandoned (`abandon_on_followers`) or new (`open_on_followers`)
        # between steps.
        self.follower_abandon: Callable[[bytes], None] | None = None
        self.follower_open: Callable[[bytes], None] | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self.linear_timings: list[LinearTiming] = []  # cuBLAS vs `kernels.gemv`, when measured (CUDA graphs)

    # -- CUDA-graph decode ----------------------------------------------------------------------
    def wants_decode_graphs(self) -> bool:
        """Graphs on CUDA with the Triton kernels on one rank, unless ``cfg.cuda_graphs`` is off."""
        # NOTE: mixture-of-experts layers group tokens by expert on the host (a sync): not capturable
        moe = any(getattr(lw, "moe", None) is not None for lw in self.model.layers)
        return (self.cfg.cuda_graphs and self.device.type == "cuda" and self.rank.world_size == 1
                and self.backend.name == "triton" and not moe)

    def setup_decode_graphs(self, max_running: int, max_model_len: int) -> DecodeGraphs:
        """Reserve a scratch page (padded rows write there), warm up and capture every bucket."""
        scratch = self.pool.alloc(1)
        if scratch is None:
            raise RuntimeError("no free KV page for the CUDA graphs' scratch slot")
        sms = num_sms(self.device)
        plan = plan_graphs(max_running, max_model_len, self.cfg.page_size, self.model.shard.num_kv_heads, sms,
                           ladder=tuple(sorted(set(self.cfg.cuda_graph_batches))) or LADDER)
        self.choose_linears([b for b in plan.buckets if b <= MAX_ROWS])
        # NOTE: warm-up positions stay inside the rotary table (max_model_len <= max_position)
        graphs = DecodeGraphs(self.model, self.pool.kv, plan, scratch[0], warmup_context=min(1024, max_model_len))
        try:
            graphs.capture()
        except RuntimeError as exc:  # a forward pass that syncs with the host cannot be captured
            print(f"pdbox engine: CUDA graph capture failed, decoding eagerly: {exc}", file=sys.stderr, flush=True)
            graphs.drop_graphs()
        self.decode_graphs = graphs
        return graphs

    def choose_linears(self, rows: list[int]) -> None:
        """Measure cuBLAS against `kernels.gemv` for each weight kind at these row counts and tell the
        backend where the GEMV won (before graph capture: the graphs replay whichever was chosen)."""
        if not hasattr(self.backend, "gemv_for") or not rows:
            return
        t0 = time.perf_counter()
        try:
            swiglu = self.model.cfg.mlp_activation == "silu"
            self.linear_timings = choose_linears(self.model, rows, plain_linear, gemv,
                                                 silu_and_mul=silu_and_mul if swiglu else None)
        except Exception as exc:  # e.g. a Triton that cannot build the GEMV: cuBLAS everywhere, as before
            print(f"pdbox engine: GEMV timing failed, every linear layer on cuBLAS: {exc}", file=sys.stderr,
                  flush=True)
            return
        try:  # apart: a norm-folded GEMV that fails keeps its norm kernel, not the choices above
            self.linear_timings += norm_rows(self.model, self.linear_timings, plain_linear, gemv, fused_add_rmsnorm,
                                             rmsnorm_gemv)
        except Exception as exc:
            print(f"pdbox engine: RMSNorm-folded GEMV timing failed, every norm a kernel of its own: {exc}",
                  file=sys.stderr, flush=True)
        self.backend.gemv_for = gemv_shapes(self.linear_timings)
        self.backend.gemv_silu_mul_for = gemv_shapes(self.linear_timings, silu_mul=True)
        self.backend.gemv_norm_for = gemv_shapes(self.linear_timings, norm=True)
        self.backend.gemv_rows = tuple(rows)
        print(f"pdbox engine: linear layers at rows {rows} ({time.perf_counter() - t0:.1f} s to measure): "
              f"{summary(self.linear_timings)}", file=sys.stderr, flush=True)

    def step(self, sb: ScheduledBatch, layer_hook: Callable[[int], None] | None = None,
             extra: bytes = b"", scoring: Sequence[tuple[Request, range]] = ()) -> torch.Tensor:
        """Logits of one scheduled step: a captured graph for a decode batch that fits, else eager.
        ``scoring``: prompt positions to score (`prompt_logprobs.spans`), whose rows follow the samples'."""
        g = self.decode_graphs
        if (g is not None and sb.decode_only and layer_hook is None and not extra and g.fits(len(sb.requests))
                and max(sb.prefix_lens) < g.plan.width * g.plan.page_size):
            return g.run(decode_rows(sb))
        return self.forward(self.build(sb, scoring), layer_hook, extra)

    # -- rank 0 -------------------------------------------------------------------------------
    def build(self, sb: ScheduledBatch, scoring: Sequence[tuple[Request, range]] = ()) -> ForwardBatch:
        """The step's metadata, built on the host and moved in ONE copy from pinned memory that never
        waits for the GPU (a copy per field from pageable memory waited for the step before)."""
        ps = self.cfg.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        base: dict[int, int] = {}  # with scoring: each request's row of position 0
        for req, start, n, sample in zip(sb.requests, sb.prefix_lens, sb.extend_lens, sb.sample):
            if scoring:
                base[id(req)] = len(ids) - start
            if n == 1 and req.output_ids and start == req.total_len - 1:
                ids.append(req.output_ids[-1])
            else:
                ids.extend(req.all_ids[start : start + n])
            pages = req.pages
            for p in range(start, start + n):
                positions.append(p)
                slots.append(pages[p // ps] * ps + p % ps)
            if sample:
                logit_rows.append(len(ids) - 1)
        logit_rows += [base[id(req)] + p for req, rng in scoring for p in rng]  # after the samples' rows
        width = table_width(max(len(r.pages) for r in sb.requests), self.device)
        table = [r.pages + [0] * (width - len(r.pages)) for r in sb.requests]
        values = ForwardBatch.flat_values(ids, positions, slots, table, list(sb.prefix_lens), list(sb.extend_lens),
                                          logit_rows, sb.decode_only)
        flat = to_device(values, self.device, torch.int64)
        batch = ForwardBatch.from_flat(flat, values[:HEADER_LEN])
        batch.page_table = batch.page_table.to(torch.int32)
        return batch

    def forward(self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None,
                extra: bytes = b"") -> torch.Tensor:
        """Run one step on every rank; returns fp32 logits of ``batch.logit_rows`` (rank 0).

        ``extra`` (JSON bytes) reaches the other ranks' :attr:`follower_hook` with the batch: the
        handoff plan that tells each prefill rank which pages to push where.
        """
        if self.tp_group is None:
            with self._eager_splits(batch):
                hidden = self.model.forward(batch, self.pool.kv, layer_hook)
        else:
            command = tp.attach_bytes(batch.pack(), extra)  # NOTE: outside: a failure here leaves the group in step
            with self._group_step(), self._eager_splits(batch):
                self.tp_group.broadcast_command(tp.CMD_FORWARD, command)
                hidden = self.model.forward(batch, self.pool.kv, layer_hook)
        if batch.logit_rows.numel() == 0:
            return torch.empty(0, self.model_config.vocab_size)
        return self.model.logits(hidden)

    @contextlib.contextmanager
    def _eager_splits(self, batch: ForwardBatch) -> Iterator[None]:
        """An eager decode step on a GPU cuts each context by its longest one, known on the host (every rank
        reads it from the step's header), not by its table's width: that is a multiple of 16 pages, so with
        pages over 16 tokens even a one-page context would split, and the unsplit compile would wait for a
        batch big enough to fill the GPU (`Engine.warm_up_eager` runs a short prompt to make it)."""
        if not (batch.decode_only and batch.max_seq and self.device.type == "cuda"):
            yield
            return
        count = num_splits_for(batch.batch_size, self.model.shard.num_kv_heads, batch.max_seq, num_sms(self.device))
        with decode_splits(self.backend, count):
            yield

    def abandon_on_followers(self, rooms: bytes) -> None:
        """Rank 0, between steps: the other ranks abandon these rooms too (``rooms``: the handoff's JSON),
        after the writes of every step they ran before (commands are followed in order)."""
        self._rooms_to_followers(tp.CMD_ABANDON, rooms)

    def open_on_followers(self, rooms: bytes) -> None:
        """Rank 0, between steps: a prefill leg arrived; the other ranks ask its decode pools for these rooms
        now, as rank 0 did, so that their answers are back before their first write (learning of a room
        from its first step, each waited a round trip at layer 0 while the others waited in the all-reduce)."""
        self._rooms_to_followers(tp.CMD_OPEN, rooms)

    def _rooms_to_followers(self, cmd: int, rooms: bytes) -> None:
        if self.tp_group is not None and self.group_failure() is None:  # a broken group takes no command
            with self._group_step():
                self.tp_group.broadcast_command(cmd, tp.attach_bytes(torch.empty(0, dtype=torch.int64), rooms))

    def _group_step(self) -> contextlib.AbstractContextManager:
        """Rank 0: a command and its collectives, with no keepalive ping between them."""
        return self.keepalive.step() if self.keepalive is not None else contextlib.nullcontext()

    def group_failure(self) -> str | None:
        """Rank 0: why its TP group is broken (a rank's process exited; a step raised inside the group; a
        keepalive ping failed), or None."""
        if self.keepalive is None:
            return None
        return (self._ranks_failed() if self._ranks_failed is not None else None) or self.keepalive.error

    # -- ranks > 0 ----------------------------------------------------------------------------
    def follow(self) -> None:
        """Execute rank 0's commands until it says stop."""
        if self.tp_group is None:
            raise RuntimeError("only a TP rank > 0 follows rank 0's commands; this runner is in no TP group")
        while True:
            cmd, payload = self.tp_group.receive_command()
            if cmd == tp.CMD_STOP:
                return
            if cmd == tp.CMD_PING:
                continue
            if cmd == tp.CMD_FORWARD and payload is not None:
                flat, extra = tp.detach_bytes(payload)
                batch = ForwardBatch.unpack(flat.to(self.device))
                batch.page_table = batch.page_table.to(torch.int32)
                hook = after = None
                if extra and self.follower_hook is not None:
                    hook, after = self.follower_hook(extra, self.pool.kv)
                with self._eager_splits(batch):
                    self.model.forward(batch, self.pool.kv, hook)
                if after is not None:
                    after()
            elif cmd == tp.CMD_ABANDON and payload is not None and self.follower_abandon is not None:
                self.follower_abandon(tp.detach_bytes(payload)[1])
            elif cmd == tp.CMD_OPEN and payload is not None and self.follower_open is not None:
                self.follower_open(tp.detach_bytes(payload)[1])

    def close(self, broken: bool = False) -> None:
        """``broken``: the group is out of step (a rank died, a step failed inside it): no collective is
        tried (it would wait for a rank that never joins it), and NCCL's communicators are aborted, not
        finalized (which waits for the kernels of collectives that will never complete)."""
        if self.keepalive is not None:
            self.keepalive.stop()
        if self.tp_group is not None and torch.distributed.is_initialized():
            if self.rank.rank == 0 and not broken:
                with self._group_step():
                    self.tp_group.broadcast_command(tp.CMD_STOP)
            tp.leave_group(self.tp_group, broken)

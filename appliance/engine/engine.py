"""The engine: requests in, tokens out, one scheduler step at a time (rank 0 of its TP group)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from appliance.config import EngineConfig, RankInfo
from appliance.engine import fork, prompt_logprobs
from appliance.engine.core_team import CoreTeam
from appliance.engine.grammar import GrammarCompiler, consume
from appliance.engine.prefix_cache import RadixCache
from appliance.engine.rank_device import bind_device
from appliance.engine.request import Request, RequestOutput, RequestStatus, SamplingParams
from appliance.engine.row_failure import failure_status, row_failure
from appliance.engine.runner import ModelRunner, checkpoint_for
from appliance.engine.sampler import Sampler
from appliance.engine.scheduler import ScheduledBatch, Scheduler
from appliance.engine.tp_worker import spawn_tp_workers
from appliance.model.loader import resolve_model_path
from appliance.model.random_model import is_random_spec
from appliance.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from appliance.engine.handoff import Transfer

log = logging.getLogger("pdbox.engine")


class StepHooks(Protocol):
    """What a prefill-side handoff plugs into each step (see ``appliance.engine.handoff``)."""

    def open(self, t: Transfer) -> None: ...

    def before_forward(self, sb: ScheduledBatch) -> tuple[Callable[[int], None] | None, bytes]: ...

    def after_first_token(self, req: Request, token: int, logprob: dict | None) -> None: ...

    def abandon(self, t: Transfer) -> None: ...

    def wait_copies(self) -> None: ...


class Engine:
    """Continuous-batching inference over a paged KV cache.

    Not thread-safe: one thread calls :meth:`add_request`, :meth:`step` and :meth:`abort`.
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, kv_allocator=None,
                 handoff: StepHooks | None = None, tp_transport: str = "",
                 tp_transport_opts: dict[str, str] | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random = is_random_spec(model)
        self.model_path = str(model) if random else str(resolve_model_path(model))
        self._tp_procs: list = []
        rank, store = RankInfo(), None
        if cfg.tp_size > 1:  # NOTE: before rank 0 loads its checkpoint: every rank loads its own at once
            init, self._tp_procs, store = spawn_tp_workers(self.model_path, cfg, tp_transport, tp_transport_opts)
            rank = RankInfo(rank=0, world_size=cfg.tp_size, dist_init=init)
        # NOTE: a random spec's weights are drawn on the engine's device (cuda:N for TP rank 0).
        where = bind_device(cfg.device, RankInfo(world_size=cfg.tp_size), share_gpu=cfg.tp_backend == "gloo") \
            if random else "cpu"
        ckpt = checkpoint_for(self.model_path, where, cfg.dtype)
        self.model_name = ckpt.name
        self.tokenizer = Tokenizer.from_checkpoint(ckpt)
        self.runner = ModelRunner(ckpt, cfg, rank, kv_allocator=kv_allocator, tp_store=store,
                                  ranks_failed=self._dead_ranks)
        self.model_config = self.runner.model_config
        self.pool = self.runner.pool
        self.cache = RadixCache(self.pool, enabled=cfg.enable_prefix_cache)
        self.scheduler = Scheduler(self.pool, self.cache, cfg.max_running, cfg.prefill_chunk,
                                   prefill_order=cfg.prefill_order)
        self.sampler = Sampler(cfg.seed)
        limit = self.model_config.max_position
        graphs = self.runner.wants_decode_graphs()
        usable_pages = self.pool.num_pages - (1 if graphs else 0)  # graphs keep one scratch page
        self.max_model_len = min(cfg.max_model_len or limit, limit, usable_pages * cfg.page_size - 1)
        self.eos_ids = set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        self.requests: dict[str, Request] = {}
        self.handoff: StepHooks | None = None  # set after the warm-up, which is no one's handoff
        self.cores: CoreTeam | None = None  # a CPU worker's team: its cores, a partner's (`engine/core_team.py`)
        self.decode_step_s = 0.05  # EMA of decode-only step time (kept current by step())
        self.stats_prefill_tokens = 0
        self.stats_decode_tokens = 0
        self.warmup_s = 0.0
        if graphs:
            self.warm_up()
        elif self.runner.device.type == "cuda":
            self.warm_up_eager()
        self.handoff = handoff

    def warm_up(self) -> None:
        """CUDA start-up: capture the decode graphs (every Triton compile and autotune of decode runs
        here) and run one throw-away prefill (the prefill kernels'), so serving compiles nothing."""
        t0 = time.perf_counter()
        g = self.runner.setup_decode_graphs(self.config.max_running, self.max_model_len)
        if g.use_graphs:  # a decode step never outgrows the largest graph (the others take turns)
            self.scheduler.max_decode = g.plan.max_bucket
            if g.plan.max_bucket < self.config.max_running:
                print(f"pdbox engine: the largest CUDA graph holds {g.plan.max_bucket} requests, under max_running "
                      f"{self.config.max_running}: decode steps take {g.plan.max_bucket} at a time, in turns",
                      file=sys.stderr, flush=True)
        self._throwaway((512,))
        self.warmup_s = time.perf_counter() - t0
        print(f"pdbox engine: warm-up {self.warmup_s:.1f} s (decode buckets {list(g.plan.buckets)}: "
              f"compile+autotune {g.warmup_s:.1f} s, graph capture {g.capture_s:.1f} s)",
              file=sys.stderr, flush=True)

    def warm_up_eager(self) -> None:
        """CUDA start-up without graphs (tensor parallel, mixture-of-experts, ``cuda_graphs`` off): throw-away
        prompts through every rank, so the first requests do not compile the prefill and decode kernels.
        The long prompt's decode step splits its context, the short one's does not (an eager step splits by
        its longest context, `ModelRunner._eager_splits`), which are decode attention's two compiles
        (`kernels.decode_attention`)."""
        t0 = time.perf_counter()
        self._throwaway((512, 8))
        self.warmup_s = time.perf_counter() - t0
        print(f"pdbox engine: warm-up {self.warmup_s:.1f} s (eager decode: no CUDA graphs)", file=sys.stderr,
              flush=True)

    def _throwaway(self, lengths: Sequence[int]) -> None:
        """Run prompts of these lengths one after another (a prefill and a decode step each), then forget
        them: their compiles must bias neither the cost model nor the counters, nor leave cached pages."""
        rate, step_s = self.scheduler.prefill_rate, self.decode_step_s
        for k, length in enumerate(lengths):
            # NOTE: not cut to a prefill step: a long prompt's decode must split (`warm_up_eager`), and its
            # chunks run the extend kernels with a cached prefix, as serving does
            n = max(1, min(length, self.max_model_len - 2, (self.pool.num_free - 1) * self.config.page_size))
            ids = [(7 * i + 3 + k) % self.model_config.vocab_size for i in range(n)]
            req = self.add_request(ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                   request_id=f"warm-up-{k}-{time.monotonic_ns()}")
            self.run_until_done([req])
        self.cache.reset()
        self.scheduler.prefill_rate, self.decode_step_s = rate, step_s
        self.stats_prefill_tokens = self.stats_decode_tokens = 0

    # -- requests -----------------------------------------------------------------------------
    def validate_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens but the context holds {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= int(t) < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> Request:
        self.validate_prompt(prompt_ids, params)
        req = Request(prompt_ids=list(prompt_ids), params=params, arrival=time.monotonic())
        if request_id is not None:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            req.request_id = request_id
        if params.constraint is not None:
            req.matcher = self.grammars.matcher(params.constraint)
        self._early_stops(req)
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req

    def _early_stops(self, req: Request) -> None:
        """min_tokens: what the sampler bans while the answer is shorter."""
        p = req.params
        if p.min_tokens:
            req.early_stops = tuple(dict.fromkeys((*(() if p.ignore_eos else self.eos_ids), *p.stop_token_ids)))

    def abort(self, request_id: str) -> bool:
        """Stop a request (and its forked samples) wherever it is and free its pages. False if unknown
        or finished."""
        req = self.requests.pop(request_id, None)
        for kid in [k for k in self.requests if k.startswith(f"{request_id}~")]:  # its samples (n > 1)
            self.abort(kid)
        if req is None or req.is_finished:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def _fork(self, req: Request) -> None:
        """``req``'s prompt is computed: share its pages with samples 1 .. n-1 (`appliance.engine.fork`)."""
        path = fork.publish_prompt(self.cache, req)
        kids = fork.children(req, path, self.cache)
        for kid in kids:
            if kid.params.constraint is not None:
                kid.matcher = self.grammars.matcher(kid.params.constraint)
            self.requests[kid.request_id] = kid
        self.scheduler.add_front(kids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sb = self.scheduler.schedule()
        if sb is None:
            return []
        t0 = time.perf_counter()
        hook, extra = self.handoff.before_forward(sb) if self.handoff else (None, b"")
        if self.cores is not None:  # fit the team: an idle partner's cores borrowed, cores busy elsewhere left
            self.cores.fit()
            hook = self.cores.layer_hook(hook)
        # prompt logprobs: the positions this step scores (never in a decode step), found before it scores them
        scoring = [] if sb.decode_only else prompt_logprobs.spans(sb.requests, sb.prefix_lens, sb.extend_lens)
        logits = self.runner.step(sb, hook, extra, scoring)
        sampling = [r for r, s in zip(sb.requests, sb.sample) if s]
        if scoring:  # the prompt positions' rows follow the sampling rows (runner.build)
            prompt_logprobs.score(logits[len(sampling):], scoring)
            logits = logits[:len(sampling)]
        mask = self.grammars.mask([r.matcher for r in sampling]) if sampling else None
        tokens, logprobs = self.sampler.sample(logits, sampling, mask) if sampling else ([], [])
        prefill = 0
        for req, n in zip(sb.requests, sb.extend_lens):
            req.computed_len += n
            if req.output_ids and n == 1:
                self.stats_decode_tokens += n
            else:
                prefill += n
        self.stats_prefill_tokens += prefill
        if prefill >= 32:  # keep the slack scheduler's prefill-rate estimate current (EMA)
            rate = prefill / max(time.perf_counter() - t0, 1e-6)
            self.scheduler.prefill_rate = 0.8 * self.scheduler.prefill_rate + 0.2 * rate
        elif sb.decode_only:
            self.decode_step_s = 0.9 * self.decode_step_s + 0.1 * (time.perf_counter() - t0)
        outputs: list[RequestOutput] = []
        failed: set[str] = set()  # requests (by their samples' root) failed in this step, once each
        for req, tok in zip(sampling, tokens):
            if tok < 0 and (req.group or req.request_id) not in failed:
                failed.add(req.group or req.request_id)
                outputs.append(self._fail(req, tok))
        for req in sampling:
            if fork.wants_fork(req) and (req.group or req.request_id) not in failed:
                self._fork(req)
        for req, tok, lp in zip(sampling, tokens, logprobs):
            if (req.group or req.request_id) in failed:
                continue
            if self.handoff is not None and req.prefill_only:
                self.handoff.after_first_token(req, tok, lp)
            outputs.append(self._append_token(req, tok, lp))
        return outputs

    def _fail(self, req: Request, code: int) -> RequestOutput:
        """End ``req`` (and, with n > 1, its sibling samples) with finish_reason "error": its row sampled
        to failure ``code`` (`appliance.engine.row_failure`); the others in the step go on. A prefill
        leg's transfer stops: its room is never signalled."""
        why = row_failure(code)
        if req.transfer is not None and req.transfer.error is None:
            req.transfer.error = why
        root = req.group or req.request_id
        ended = [r for k, r in self.requests.items() if k == root or k.startswith(f"{root}~")]
        self.abort(root)  # the request, or its samples' root and every sibling still here
        for r in (*ended, req):  # req is among them; a sample already finished keeps its answer
            r.status, r.finish_reason, r.error = RequestStatus.FINISHED, "error", why
        log.warning("request %s failed: %s", root, why)
        return RequestOutput(request_id=req.request_id, new_token_ids=[], text=req.text, finished=True,
                             finish_reason="error", prompt_len=req.prompt_len, cached_len=req.cached_len,
                             group=req.group, index=req.index, error=why, error_status=failure_status(code))

    # -- disaggregation: the decode side --------------------------------------------------------
    def reserve_pages(self, num_tokens: int) -> list[int] | None:
        """Pages for a handed-over prompt of ``num_tokens`` plus its first decode token, or None."""
        return self.scheduler.alloc_pages(-(-(num_tokens + 1) // self.config.page_size))

    def unreserve_pages(self, pages: list[int]) -> None:
        self.pool.free(pages)

    def inject(self, prompt_ids: Sequence[int], params: SamplingParams, pages: list[int], first_token: int,
               first_logprob: dict | None, request_id: str, earlier: Sequence[int] = ()) -> RequestOutput:
        """Join a request whose prompt KV was written into ``pages`` by a prefill engine.

        The first token (sampled by prefill) is appended without any forward pass here; the next
        step decodes from it. May finish at once (EOS, a stop, max_tokens=1). A request moved from
        another decode engine arrives with the tokens it generated there: ``earlier`` (their KV is
        in ``pages`` too) and, as ``first_token``, the last one, sampled but not yet fed. A
        constrained request's matcher is rebuilt here from ``params`` and replays ``earlier``
        (``first_token`` is consumed as it is appended), so a move keeps the constraint.
        """
        req = Request(prompt_ids=list(prompt_ids), params=params, request_id=request_id, arrival=time.monotonic())
        if params.constraint is not None:
            req.matcher = self.grammars.matcher(params.constraint, replay=earlier)
        req.pages = list(pages)
        req.output_ids = list(earlier)
        self._early_stops(req)
        req.computed_len = req.total_len
        req.status = RequestStatus.RUNNING
        self.requests[request_id] = req
        self.scheduler.running.append(req)
        if fork.wants_fork(req):
            self._fork(req)
        return self._append_token(req, first_token, first_logprob)

    def _append_token(self, req: Request, token: int, logprob: dict | None) -> RequestOutput:
        req.output_ids.append(token)
        if logprob is not None:
            req.output_logprobs.append(logprob)
        p = req.params
        reason: str | None = None
        early = len(req.output_ids) < p.min_tokens  # min_tokens: nothing but the length ends it yet
        if not early and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)):
            reason = "stop"
        if req.matcher is not None and consume(req.matcher, token):
            reason = "stop"  # the constrained answer is complete: only EOS could follow
        # NOTE: detokenize only when a stop string needs the text or the request ends: the serving
        # path streams token ids (the router detokenizes), so a per-token decode here is wasted work.
        text: str | None = None
        if p.stop and not early:
            text = self.tokenizer.decode(req.output_ids)
            if req.stop_from is None:  # the first min_tokens - 1 tokens' text cannot hold a stop string's start
                req.stop_from = len(self.tokenizer.decode(req.output_ids[:p.min_tokens - 1])) if p.min_tokens > 1 else 0
            cut = min((i for i in (text.find(s, req.stop_from) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None and (len(req.output_ids) >= p.max_tokens or req.total_len >= self.max_model_len):
            reason = "length"
        if text is None and reason is not None:
            text = self.tokenizer.decode(req.output_ids)
        if text is not None:
            req.text = text
        else:
            text = req.text
        if reason is not None:
            self.scheduler.finish(req, reason)
            self.requests.pop(req.request_id, None)
        scored = (p.prompt_logprobs is not None and len(req.output_ids) == 1
                  and len(req.prompt_logprobs) == req.prompt_len - 1)  # not on a decode engine after a handoff
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[token],
            text=text, finished=reason is not None, finish_reason=reason, prompt_len=req.prompt_len,
            cached_len=req.cached_len, logprobs=[logprob] if logprob else [], group=req.group, index=req.index,
            prompt_logprobs=req.prompt_logprobs if scored else None,
        )

    def calibrate(self, prompt_tokens: int = 256, decode_steps: int = 8) -> tuple[float, float]:
        """Measure prefill tokens/s and the decode step time on this device (adaptive mode's cost model).

        Runs one throw-away request, leaves no pages behind; returns ``(prefill_tok_s, decode_step_s)``.
        """
        ids = [(7 * i + 3) % self.model_config.vocab_size for i in range(prompt_tokens)]
        req = self.add_request(ids, SamplingParams(max_tokens=decode_steps + 1, temperature=0, ignore_eos=True),
                               request_id=f"calibrate-{time.monotonic_ns()}")
        t0 = time.perf_counter()
        while not req.output_ids:
            self.step()
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while not req.is_finished:
            self.step()
        step_s = (time.perf_counter() - t0) / decode_steps
        self.cache.reset()
        self.scheduler.prefill_rate = prompt_tokens / max(prefill_s, 1e-6)
        self.decode_step_s = step_s
        return self.scheduler.prefill_rate, step_s

    def run_until_done(self, reqs: Sequence[Request]) -> None:
        while any(r.status is not RequestStatus.FINISHED for r in reqs):
            self.step()

    def _dead_ranks(self) -> str | None:
        dead = [f"{p.name} (exit code {p.exitcode})" for p in self._tp_procs if not p.is_alive()]
        return f"tensor-parallel rank process {', '.join(dead)} exited" if dead else None

    def tp_failure(self) -> str | None:
        """Why this engine's TP group can step no more (a rank's process exited; a step failed on rank 0,
        which may have left the others inside a collective; under gloo, a keepalive ping failed), or None.
        Rank 0 alone cannot go on: every step's collectives need them all."""
        return self.runner.group_failure()

    def shutdown(self) -> None:
        broken = self.tp_failure() is not None
        if broken:  # NOTE: first: they may wait inside a collective that rank 0 left
            for p in self._tp_procs:
                p.kill()
        self.runner.close(broken=broken)
        for p in self._tp_procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._tp_procs = []

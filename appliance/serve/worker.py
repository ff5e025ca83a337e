"""A worker process: one engine (with its TP ranks) behind an HTTP server, in one role.

Roles: ``unified`` runs whole requests; ``prefill`` computes prompts and pushes their KV into a
decode engine's pages; ``decode`` reserves pages for a room, waits for the handoff, then decodes.
Internal endpoints require the cluster token (``Authorization: Bearer …``). Its settings and command
line: :mod:`appliance.serve.worker_config`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace

import msgspec
from aiohttp import web

from appliance.serve.auth import bearer_ok
from appliance.serve.build_thread import build_engine_for_serving
from appliance.serve.internal_error import error_middleware, error_response
from appliance.serve.load_report import LoadReport
from appliance.serve.protocol import (
    MAX_LEASE_S,
    DecodeRequest,
    Done,
    Error,
    Event,
    ExtendRequest,
    GenerateRequest,
    Moved,
    MoveRequest,
    PrefillAnswer,
    PrefillRequest,
    Reserved,
    Tokens,
    encode_line,
)
from appliance.serve.stream_write import eof_within, write_within
from appliance.serve.worker_config import WorkerConfig, worker_config

log = logging.getLogger("pdbox.worker")
TRANSPORT_CLOSE_S = 15.0  # how long the shutdown waits for a TP rank 0's transport to close beside the engine's


class Worker:
    """The HTTP face of one engine."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.started = time.time()
        self.transport = None
        self.handle_json = ""
        self.handoff = None
        self.loop = None  # EngineLoop, created in start()
        self.engine = None
        self.metrics = None

    # -- start-up (blocking: loads the model) -------------------------------------------------------
    def build_engine(self) -> None:
        from appliance.engine.engine import Engine

        cfg = self.cfg
        kv_allocator = None
        tp_transport = ""
        opts = {"run_id": f"{cfg.run_id}-{cfg.name}", "host": cfg.transport_host}
        if cfg.advertise_host:
            opts["advertise_host"] = cfg.advertise_host
        job = self._nvshmem_job()
        if cfg.role in ("prefill", "decode", "auto") and job is None:
            import nvshmem_kv
            from appliance.engine.rank_device import lead_device
            from nvshmem_kv.registry import DEVICE_BOUND

            lead = lead_device(cfg.engine.device, cfg.engine.tp_size, share_gpu=cfg.engine.tp_backend == "gloo")
            bound = {"device": lead} if lead and cfg.transport in DEVICE_BOUND else {}
            self.transport = nvshmem_kv.create(cfg.transport, **opts, **bound)
        if cfg.role in ("decode", "auto") or job is not None:
            from nvshmem_kv import PoolDescriptor

            def kv_allocator(shape, dtype, device):  # the pool lives where the transport can export it
                if self.transport is None:  # nvshmem: this rank joins the job now, its TP group formed
                    from appliance.nvshmem_job import create_transport

                    self.transport = create_transport(job, 0, device, opts)
                desc = PoolDescriptor(str(dtype).removeprefix("torch."), shape[1], shape[2], shape[3],
                                      self._total_kv_heads, shape[4], shape[5], 0, cfg.engine.tp_size)
                self._desc = desc
                return self.transport.allocate_pool(desc, device)

            from appliance.model.loader import load_config

            self._total_kv_heads = load_config(cfg.model).num_kv_heads  # the header alone: no weight is read
        if cfg.role == "prefill" and cfg.engine.tp_size > 1:
            tp_transport = cfg.transport
        self.engine = Engine(cfg.model, cfg.engine, kv_allocator=kv_allocator, tp_transport=tp_transport,
                             tp_transport_opts=opts)
        if cfg.role in ("decode", "auto"):
            self.handle_json = self.transport.register_pool(self.engine.pool.kv, self._desc).to_json().decode()
        if cfg.role in ("prefill", "auto"):
            from appliance.engine.handoff import PrefillHandoff

            mc = self.engine.model_config
            self.handoff = PrefillHandoff(self.transport, self.engine.pool.kv, mc.num_kv_heads, cfg.engine.page_size,
                                          cfg.engine.tp_size,
                                          followers=self.engine.runner if cfg.engine.tp_size > 1 else None)
            self.engine.handoff = self.handoff
            self.engine.warmup_s += self.handoff.sender.warm_s  # `pdbox up` reports the whole warm-up
        if cfg.role == "auto":
            self.engine.calibrate()  # adaptive mode's cost model: this device's prefill rate and step time
        self._fit_team()

    def _fit_team(self) -> None:
        """A CPU engine's team keeps off the cores other work keeps busy, where a free one can stand in: with
        a partner, over both engines' cores (borrowed while the partner idles); alone, over its own when it
        has several (`appliance/engine/core_team.py`)."""
        cfg = self.cfg
        alone = cfg.cores is None and len(cfg.cpus) > 1 and cfg.engine.tp_size == 1 \
            and cfg.engine.device.startswith("cpu")
        if cfg.cores is None and not alone:
            return
        from appliance.engine.core_share import SharedCores
        from appliance.engine.core_team import CoreTeam
        from appliance.engine.foreign_load import ForeignLoad

        try:
            if cfg.cores is not None:
                self.engine.cores = SharedCores(cfg.cores, ForeignLoad(cfg.cores.home, cfg.cores.lent))
            else:
                self.engine.cores = CoreTeam(cfg.cpus, (), ForeignLoad(cfg.cpus, ()))
        except (RuntimeError, OSError, ValueError) as exc:  # e.g. no C compiler: serve on its own cores
            what = "core sharing" if cfg.cores is not None else "keeping the team off busy cores"
            log.warning("worker %s: %s is off: %s", cfg.name, what, exc)

    def _nvshmem_job(self):
        """The launcher's PE plan for this worker (nvshmem only); refuses nvshmem without one."""
        if self.cfg.transport != "nvshmem" or self.cfg.role == "unified":
            return None
        from appliance.nvshmem_job import NVSHMEM_ENV, PeJob

        job = PeJob.from_env(os.environ)
        if job is None:
            raise ValueError(f"--transport nvshmem needs {NVSHMEM_ENV} (pdbox up numbers every rank as a PE)")
        return job

    def app(self) -> web.Application:
        from appliance.serve.engine_loop import EngineLoop
        from appliance.serve.worker_metrics import WorkerMetrics

        self.metrics = WorkerMetrics(self)
        app = web.Application(middlewares=[error_middleware, self._auth], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/load", self.load)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_post("/internal/generate", self.generate)
        app.router.add_post("/internal/prefill", self.prefill)
        app.router.add_post("/internal/decode", self.decode)
        app.router.add_post("/internal/abort", self.abort)
        app.router.add_post("/internal/move", self.move)
        app.router.add_post("/internal/extend", self.extend)

        async def lifecycle(app: web.Application):
            self.loop = EngineLoop(self.engine, asyncio.get_running_loop(), self.transport, self.metrics.on_step)
            self.loop.start()
            yield
            self.loop.stop()
            if self.engine.cores is not None:
                self.engine.cores.close()
            self._close_transport_and_engine()

        app.cleanup_ctx.append(lifecycle)
        return app

    def _close_transport_and_engine(self) -> None:
        """The handoff's transport, then the engine. With TP followers, both at once: nvshmem's close is
        collective over every PE, this rank's followers included, and a follower reaches its own close only
        once `Engine.shutdown` tells it to stop (closed first, rank 0 waited in the collective for followers
        waiting for their stop command, until both were killed)."""
        close = self.handoff.close if self.handoff is not None else getattr(self.transport, "close", None)
        if close is None:
            self.engine.shutdown()
            return
        if self.cfg.engine.tp_size == 1:
            close()
            self.engine.shutdown()
            return
        closing = threading.Thread(target=close, name="transport-close", daemon=True)
        closing.start()
        self.engine.shutdown()
        closing.join(TRANSPORT_CLOSE_S)
        if closing.is_alive():
            log.warning("the transport did not close within %.0f s of the engine's shutdown", TRANSPORT_CLOSE_S)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path.startswith("/internal/"):
            if not bearer_ok(request.headers, self.cfg.token):
                return error_response(403, "internal endpoint: cluster token required")
        return await handler(request)

    # -- public ------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.loop is not None and not self.loop.alive:  # the router marks this worker down at once
            return error_response(503, f"worker {self.cfg.name}: its engine thread has stopped")
        return web.json_response({"status": "ok", "role": self.cfg.role, "name": self.cfg.name})

    def load_info(self) -> LoadReport:
        e = self.engine
        s = e.scheduler
        return LoadReport(
            name=self.cfg.name, role=self.cfg.role, pid=os.getpid(), running=len(s.running),
            waiting=len(s.waiting), reserved_rooms=len(self.loop.rooms) if self.loop else 0,
            total_pages=e.pool.num_pages, free_pages=e.pool.num_free,
            quarantined_pages=self.loop.quarantined_pages if self.loop else 0,
            cached_pages=e.cache.num_cached_pages, evictable_pages=e.cache.evictable_pages(),
            page_size=e.config.page_size, tp=e.config.tp_size, devices=self.cfg.devices,
            transport=self.cfg.transport if self.transport is not None else "",
            model=e.model_name, uptime_s=time.time() - self.started,
            max_model_len=e.max_model_len,
            queued_prefill_tokens=sum(r.remaining_prefill for r in s.waiting)
            + sum(r.remaining_prefill for r in s.running if not r.output_ids),
            decoding=sum(1 for r in s.running if r.output_ids),
            prefill_tok_s=s.prefill_rate, decode_step_s=e.decode_step_s,
            prefill_chunk=s.max_prefill_tokens, warmup_s=e.warmup_s,
        )

    async def load(self, request: web.Request) -> web.Response:
        info = await self.loop.call(self.load_info)
        return web.Response(body=msgspec.json.encode(info), content_type="application/json")

    async def metrics_text(self, request: web.Request) -> web.Response:
        await self.loop.call(self.metrics.refresh)  # the engine's state, read on its thread
        text = self.metrics.reg.render()  # written here: the engine thread goes back to stepping
        return web.Response(text=text, content_type="text/plain")

    # -- internal ----------------------------------------------------------------------------------
    async def _decode_body(self, request: web.Request, kind: type):
        try:
            return msgspec.json.decode(await request.read(), type=kind)
        except msgspec.ValidationError as exc:
            raise web.HTTPBadRequest(text=f"bad {kind.__name__}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise web.HTTPBadRequest(text=f"malformed JSON: {exc}") from None

    def _check_role(self, *roles: str) -> None:
        if self.cfg.role not in roles:
            raise web.HTTPConflict(text=f"this worker's role is {self.cfg.role}")

    async def _stream(self, request: web.Request, rid: str, q: asyncio.Queue[Event],
                      first: Reserved | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        finished = False
        try:
            await resp.prepare(request)
            if first is not None:
                await write_within(resp, encode_line(first), self.cfg.router_stall_s)
            while True:
                ev = await q.get()
                await write_within(resp, encode_line(ev), self.cfg.router_stall_s)
                if isinstance(ev, (Done, Error, Moved)):
                    finished = True
                    break
            await eof_within(resp, self.cfg.router_stall_s)
        finally:
            self.loop.close_stream(rid)
            if not finished:  # the router went away (or we are shutting down): free everything now
                self.loop.abort(rid)
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self._check_role("unified", "decode", "prefill", "auto")
        body: GenerateRequest = await self._decode_body(request, GenerateRequest)
        try:
            params = body.sampling.to_params()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        q = self.loop.submit(body.rid, body.prompt_ids, params)
        return await self._stream(request, body.rid, q)

    async def prefill(self, request: web.Request) -> web.Response:
        from appliance.engine.handoff import Transfer

        self._check_role("prefill", "auto")
        body: PrefillRequest = await self._decode_body(request, PrefillRequest)
        try:
            params = body.sampling.to_params()
            # the first token only; the stop tokens stay while min_tokens bans them from it
            params = replace(params, max_tokens=1, stop=(), stop_token_ids=params.stop_token_ids if params.min_tokens
                             else ())
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        _check_handles(body.handles)
        transfer = Transfer(room=body.room, handles=list(body.handles), dst_pages=list(body.dst_pages))
        q = self.loop.submit(body.rid, body.prompt_ids, params, transfer)
        finished = False
        try:
            events = []
            while True:
                ev = await q.get()
                events.append(ev)
                if isinstance(ev, (Done, Error)):
                    finished = True
                    break
        finally:
            self.loop.close_stream(body.rid)
            if not finished:
                self.loop.abort(body.rid)
        last = events[-1]
        if isinstance(last, Error):
            return error_response(last.status or 500, last.message)
        assert isinstance(last, Done)
        tokens = [t for ev in events if isinstance(ev, Tokens) for t in ev.token_ids]
        logprobs = [lp for ev in events if isinstance(ev, Tokens) for lp in ev.logprobs]
        scored = next((ev.prompt_logprobs for ev in events
                       if isinstance(ev, Tokens) and ev.prompt_logprobs is not None), None)
        answer = PrefillAnswer(token_ids=tokens, logprobs=logprobs, prompt_tokens=last.prompt_tokens,
                               cached_tokens=last.cached_tokens, prompt_logprobs=scored)
        return web.Response(body=msgspec.json.encode(answer), content_type="application/json")

    async def decode(self, request: web.Request) -> web.StreamResponse:
        from nvshmem_kv import writers_for

        self._check_role("decode", "auto")
        body: DecodeRequest = await self._decode_body(request, DecodeRequest)
        try:
            params = body.sampling.to_params()
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        if not 0 < body.lease_s <= MAX_LEASE_S:
            raise web.HTTPBadRequest(text=f"lease_s must be in (0, {MAX_LEASE_S:.0f}], got {body.lease_s}")
        signals = len(writers_for(self._desc, body.prefill_tp))
        try:
            q = self.loop.open_stream(body.rid)
        except ValueError as exc:
            return error_response(409, str(exc))
        try:
            pages = await self.loop.call(lambda: self.loop.reserve(body.rid, body.room, body.prompt_ids, params,
                                                                   signals, body.lease_s, body.reserve_tokens))
        except Exception as exc:
            self.loop.close_stream(body.rid)
            self.loop.abort(body.rid)  # the reservation may still run after a timeout: drop it then
            status = 400 if isinstance(exc, ValueError) else 503
            return error_response(status, str(exc))
        except BaseException:  # the router went away while we reserved
            self.loop.close_stream(body.rid)
            self.loop.abort(body.rid)
            raise
        if pages is None:
            self.loop.close_stream(body.rid)
            return error_response(503, "no free KV pages for this prompt")
        first = Reserved(pages=pages, handles=[self.handle_json])
        return await self._stream(request, body.rid, q, first)

    async def move(self, request: web.Request) -> web.Response:
        """Hand a decoding request over to another engine (its pages there reserved by the router)."""
        from nvshmem_kv import TransportError

        self._check_role("auto")
        body: MoveRequest = await self._decode_body(request, MoveRequest)
        _check_handles(body.handles)
        try:
            await self.loop.call(lambda: self.loop.move_out(body.rid, body.room, list(body.handles),
                                                            list(body.dst_pages)))
        except ValueError as exc:
            return error_response(409, str(exc))
        except (TransportError, OSError) as exc:
            return error_response(502, f"KV push failed: {exc}")
        return web.json_response({"ok": True})

    async def extend(self, request: web.Request) -> web.Response:
        """Renew a reserved room's lease while its prefill is still on the way; ``ok`` false when the room
        is no longer waiting (done, failed or released)."""
        self._check_role("decode", "auto")
        body: ExtendRequest = await self._decode_body(request, ExtendRequest)
        if not 0 < body.lease_s <= MAX_LEASE_S:
            raise web.HTTPBadRequest(text=f"lease_s must be in (0, {MAX_LEASE_S:.0f}], got {body.lease_s}")
        return web.json_response({"ok": self.loop.extend(body.room, body.lease_s)})

    async def abort(self, request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read(), type=dict[str, str])
        except msgspec.MsgspecError as exc:
            raise web.HTTPBadRequest(text=f"bad abort body: {exc}") from None
        self.loop.abort(body.get("rid", ""))
        return web.json_response({"ok": True})


def _check_handles(handles: list[str]) -> None:
    """400 unless every decode pool handle parses. NOTE: a bad handle must fail the request here, not
    the engine step that would push into it later."""
    from nvshmem_kv import PoolHandle, TransportError

    if not handles:
        raise web.HTTPBadRequest(text="handles must name at least one decode pool")
    for h in handles:
        try:
            PoolHandle.from_json(h)
        except (TransportError, msgspec.MsgspecError) as exc:
            raise web.HTTPBadRequest(text=f"bad pool handle: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    cfg, register = worker_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from appliance.engine.tp import die_with_parent

    die_with_parent()
    if cfg.cpus:
        if cfg.cores is not None:
            # GNU OpenMP counts the cores its threads may spin on once, as it loads. Load it (torch links
            # it) while the process may still run on the partner's cores, else it counts one core for a
            # team of two and a borrowed thread sleeps between ops: a 2-thread batch-1 decode step took
            # 15.5 ms that way against 9.6 (13.7 on one thread), 2-core Zen 4.
            os.sched_setaffinity(0, (*cfg.cpus, *cfg.cores.lent))
            import torch  # noqa: F401
        os.sched_setaffinity(0, cfg.cpus)
    worker = Worker(cfg)
    build_engine_for_serving(worker)
    sys.exit(run_app(worker, register))


EXIT_ENGINE_FATAL = 70  # the engine could serve no more (a TP rank died): the launcher restarts the worker


def run_app(worker: Worker, register_url: str = "") -> int:
    """Serve until a signal (exit status 0), or until the engine can serve no more (`EXIT_ENGINE_FATAL`)."""
    fatal: list[str] = []

    async def watch_engine(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            if worker.loop is not None and worker.loop.fatal is not None:
                print(f"worker {worker.cfg.name}: {worker.loop.fatal}; exiting, to be started afresh",
                      file=sys.stderr, flush=True)
                fatal.append(worker.loop.fatal)
                stop.set()

    async def serve() -> None:
        runner = web.AppRunner(worker.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, worker.cfg.host, worker.cfg.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        url = f"http://{worker.cfg.advertise_host or worker.cfg.host}:{port}"
        print(f"worker ready: {url} role={worker.cfg.role} name={worker.cfg.name}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            loop.add_signal_handler(sig, stop.set)
        if register_url:
            from appliance.serve.registration import register_worker

            await register_worker(register_url, worker.cfg, url)
        watcher = asyncio.ensure_future(watch_engine(stop))
        await stop.wait()
        watcher.cancel()
        if register_url:
            from appliance.serve.registration import deregister_worker

            await deregister_worker(register_url, worker.cfg, url)
        await runner.cleanup()

    asyncio.run(serve())
    return EXIT_ENGINE_FATAL if fatal else 0


if __name__ == "__main__":
    main()

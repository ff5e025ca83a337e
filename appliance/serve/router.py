"""The router: OpenAI API in front, prefill/decode (or unified) workers behind. Needs no GPU.

Disaggregated request lifecycle (docs/design.md §3): pick a prefill and a decode engine, mint an
unguessable room id, open the decode stream (decode reserves pages or refuses at once), send the
prompt to prefill with decode's page ids and pool handle, stream prefill's first token to the
client as soon as it is sampled, then relay decode's tokens. Retries happen only before the first
byte reaches the client.

Deadlines (every wait has one; see `RouterConfig`): a worker's decode reservation answers within
``connect_timeout_s``; prefill must hand the KV over within the room's lease (``lease_s`` +
``lease_per_token_s`` per prompt token), after which decode fails the room and the router fails
the request and cancels the prefill leg; a worker that stops answering ``/health`` for
``unhealthy_after_s`` (SIGSTOP, a hung host) is marked down and every request it holds fails at
once; a worker stream that is silent for ``stream_idle_s`` after the first token fails; no request
lives past ``request_timeout_s``; a streaming client that accepts no bytes for ``client_stall_s``
is dropped like one that disconnected (its request is aborted on every engine). A failure
before the first byte is an HTTP error (502/503); after it, an SSE ``error`` event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from appliance.model.generation import GenerationDefaults
from appliance.serve import openai_api as oai
from appliance.serve.auth import bearer_ok
from appliance.serve.detok import IncrementalText
from appliance.serve.metrics import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, Registry
from appliance.serve.policies import WorkerHandle, make_policy
from appliance.serve.protocol import (
    MAX_LEASE_S,
    DecodeRequest,
    Event,
    GenerateRequest,
    PrefillRequest,
    decode_event,
)
from appliance.serve.stream_write import eof_within, write_within

log = logging.getLogger("pdbox.router")
KV_RETRY_S = 0.25  # how often a prompt waiting for decode KV pages asks again
LATENCY = REQUEST_LATENCY_BUCKETS
TOKEN_LATENCY = TOKEN_LATENCY_BUCKETS


@dataclass(frozen=True)
class RouterConfig:
    """Router settings. The ``*_s`` fields are the deadlines listed in the module docstring."""

    mode: str = "disagg"
    served_model_name: str = "model"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""
    cluster_token: str = ""
    prefill_policy: str = "cache_aware"
    decode_policy: str = "least_load"
    unified_policy: str = "cache_aware"
    max_inflight: int = 256
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    lease_s: float = 5.0
    lease_per_token_s: float = 0.05
    max_body_bytes: int = 4 * 1024 * 1024
    page_size: int = 16
    health_interval_s: float = 1.0
    unhealthy_after_s: float = 3.0
    probe_timeout_s: float = 1.0
    stream_idle_s: float = 60.0
    client_stall_s: float = 30.0
    kv_wait_s: float = 30.0  # how long a prompt may wait for a full decode engine's KV pages before a 503
    generation: GenerationDefaults = GenerationDefaults()  # the checkpoint's sampling defaults (unset fields)

    def __post_init__(self) -> None:
        if self.mode not in ("disagg", "unified", "auto"):
            raise ValueError(f"mode must be disagg, unified or auto, got {self.mode!r}")
        if self.kv_wait_s < 0:
            raise ValueError(f"kv_wait_s must be >= 0, got {self.kv_wait_s}")


class WorkerFailed(Exception):
    """A worker broke before the client saw a byte (the router may retry elsewhere)."""


class WorkerBusy(WorkerFailed):
    """A worker answered 503: it is up but has no room now (e.g. no free KV pages); later may do."""


@dataclass
class Outcome:
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Router:
    def __init__(self, cfg: RouterConfig, tokenizer: Any, vocab_size: int, max_model_len: int = 0) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.workers: dict[str, WorkerHandle] = {}
        self.policies = {
            "prefill": make_policy(cfg.prefill_policy, cfg.page_size),
            "decode": make_policy(cfg.decode_policy, cfg.page_size),
            "unified": make_policy(cfg.unified_policy, cfg.page_size),
        }
        self.inflight = 0
        self.session: aiohttp.ClientSession | None = None
        self.started = time.time()
        self.reg = Registry(role="router", worker="router")
        r = self.reg
        self.m_requests = r.counter("pdbox_requests_total", "Requests by endpoint and outcome")
        self.m_errors = r.counter("pdbox_errors_total", "Errors by kind")
        self.m_ttft = r.histogram("pdbox_ttft_seconds", "Time to first token", LATENCY)
        self.m_tpot = r.histogram("pdbox_tpot_seconds", "Time per output token after the first", TOKEN_LATENCY)
        self.m_itl = r.histogram("pdbox_itl_seconds", "Inter-token latency", TOKEN_LATENCY)
        self.m_e2e = r.histogram("pdbox_e2e_seconds", "End-to-end request latency", LATENCY)
        self.m_handoff_tail = r.histogram("pdbox_handoff_tail_seconds",
                                          "Disagg: prefill's first token to decode's (the handoff not hidden "
                                          "behind the prefill)", TOKEN_LATENCY)
        self.m_tokens = r.counter("pdbox_output_tokens_total", "Tokens streamed to clients")
        self.m_prompt = r.counter("pdbox_prompt_tokens_total", "Prompt tokens received")
        self.m_restarts = r.counter("pdbox_worker_restarts_total", "Times the launcher restarted a worker")
        self._health_task: asyncio.Task | None = None
        self._down: dict[str, asyncio.Event] = {}  # set when the worker is marked down; replaced when it is back
        self._open: dict[str, set[aiohttp.ClientResponse]] = {}  # responses being read, closed when it goes down
        self._loading: dict[str, asyncio.Task] = {}  # at most one /load refresh in flight per worker

    # -- workers ---------------------------------------------------------------------------------
    def add_worker(self, w: WorkerHandle) -> None:
        self.workers[w.name] = w

    def remove_worker(self, name: str) -> None:
        self.workers.pop(name, None)

    def healthy(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.role == role and w.healthy]

    async def refresh(self, w: WorkerHandle) -> None:
        """Probe liveness (``/health``, answered by the worker's event loop even while its engine is busy)
        and refresh load (``/load``, answered between engine steps)."""
        if await self._probe(w):
            await self._load(w)

    async def _probe(self, w: WorkerHandle) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(w.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.probe_timeout_s)) as resp:
                alive = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            alive = False
        if alive:
            w.last_seen = time.monotonic()
        elif w.healthy and time.monotonic() - w.last_seen > self.cfg.unhealthy_after_s:
            self.mark_down(w.name, f"no answer to /health for {self.cfg.unhealthy_after_s:.0f} s")
        return alive

    async def _load(self, w: WorkerHandle) -> None:
        assert self.session is not None
        try:
            async with self.session.get(w.url + "/load", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientError(f"status {resp.status}")
                info = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return  # alive but busy: keep the last load; liveness alone decides health
        w.load = info
        w.pid = info.get("pid", w.pid)
        w.handle = info.get("handle", "")
        w.tp = info.get("tp", w.tp)
        w.transport = info.get("transport", w.transport)
        mml = int(info.get("max_model_len", 0))
        if mml and (not self.max_model_len or mml < self.max_model_len):
            self.max_model_len = mml
        if not w.healthy and time.monotonic() - w.last_seen < self.cfg.unhealthy_after_s:
            w.healthy = True
            ev = self._down.get(w.name)
            if ev is not None and ev.is_set():
                self._down[w.name] = asyncio.Event()

    def mark_down(self, name: str, reason: str) -> None:
        """Stop routing to ``name`` and fail every request it is serving now (the launcher calls this when
        the process exits; the health loop when it stops answering)."""
        w = self.workers.get(name)
        if w is None:
            return
        if w.healthy:
            log.warning("worker %s is down: %s", name, reason)
        w.healthy = False
        w.last_seen = min(w.last_seen, time.monotonic() - self.cfg.unhealthy_after_s)
        self._down_event(name).set()
        for resp in list(self._open.pop(name, ())):
            resp.close()

    def _down_event(self, name: str) -> asyncio.Event:
        ev = self._down.get(name)
        if ev is None:
            ev = self._down[name] = asyncio.Event()
        return ev

    async def _health_loop(self) -> None:
        while True:
            workers = list(self.workers.values())
            alive = await asyncio.gather(*(self._probe(w) for w in workers))
            for w, ok in zip(workers, alive):
                t = self._loading.get(w.name)
                if ok and (t is None or t.done()):
                    self._loading[w.name] = asyncio.create_task(self._load(w))
            await asyncio.sleep(self.cfg.health_interval_s)

    # -- app -------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=self.cfg.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/workers", self.list_workers)
        app.router.add_get("/openapi.json", self.openapi)

        async def lifecycle(app: web.Application):
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self.cfg.connect_timeout_s),
                connector=aiohttp.TCPConnector(limit=0),
            )
            await asyncio.gather(*(self.refresh(w) for w in self.workers.values()))
            self._health_task = asyncio.create_task(self._health_loop())
            yield
            self._health_task.cancel()
            for t in self._loading.values():
                t.cancel()
            await self.session.close()

        app.cleanup_ctx.append(lifecycle)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except oai.ApiError as exc:
            self.m_errors.inc(kind=str(exc.status))
            return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
        except web.HTTPRequestEntityTooLarge:
            self.m_errors.inc(kind="413")
            e = oai.ApiError(413, f"request body is larger than {self.cfg.max_body_bytes} bytes")
            return web.json_response(e.body(), status=413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            e = oai.ApiError(exc.status, exc.reason or "error", kind="invalid_request_error")
            return web.json_response(e.body(), status=exc.status)
        except WorkerFailed as exc:  # a worker broke before the client saw a byte
            self.m_errors.inc(kind="502")
            e = oai.ApiError(502, f"worker failed: {exc}", kind="server_error")
            return web.json_response(e.body(), status=502)
        except Exception:  # a router bug: still an OpenAI-shaped answer, and a traceback in the log
            log.exception("unhandled error serving %s %s", request.method, request.path)
            self.m_errors.inc(kind="500")
            e = oai.ApiError(500, "internal router error (logged)", kind="server_error")
            return web.json_response(e.body(), status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        # /internal/* (Slurm worker registration) is gated by the cluster token in its own sub-app.
        if self.cfg.api_key and request.path != "/health" and not request.path.startswith("/internal/"):
            if not bearer_ok(request.headers, self.cfg.api_key):
                raise oai.ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                   kind="authentication_error")
        return await handler(request)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.cfg.served_model_name, "object": "model", "created": int(self.started), "owned_by": "pdbox",
             "max_model_len": self.max_model_len}]})

    def roles(self) -> tuple[str, ...]:
        return ("unified",) if self.cfg.mode == "unified" else ("prefill", "decode")

    async def health(self, request: web.Request) -> web.Response:
        ok = all(self.healthy(r) for r in self.roles())
        return web.json_response({"status": "ok" if ok else "degraded",
                                  "workers": {r: len(self.healthy(r)) for r in self.roles()}},
                                 status=200 if ok else 503)

    async def list_workers(self, request: web.Request) -> web.Response:
        out = []
        for w in self.workers.values():
            out.append({"name": w.name, "role": w.role, "url": w.url, "pid": w.pid, "devices": w.devices, "tp": w.tp,
                        "transport": w.transport, "healthy": w.healthy, "inflight": w.inflight,
                        "restarts": w.restarts, "load": {k: v for k, v in w.load.items() if k != "handle"}})
        return web.json_response({"mode": self.cfg.mode, "model": self.cfg.served_model_name, "workers": out})

    async def metrics(self, request: web.Request) -> web.Response:
        from appliance.serve.metrics_merge import merge_prometheus

        r = self.reg
        r.gauge("pdbox_router_inflight", "Requests in flight at the router").set(self.inflight)
        r.gauge("pdbox_uptime_seconds", "Seconds since the process started").set(time.time() - self.started)
        # NOTE: per-worker series the router keeps carry the worker's own role/worker labels.
        healthy = r.gauge("pdbox_worker_healthy", "1 when the worker answers health checks")
        inflight = r.gauge("pdbox_worker_inflight", "Requests the router has in flight on the worker")
        healthy.clear()
        inflight.clear()
        self.m_restarts.clear()
        for w in self.workers.values():
            self.m_restarts.set_total(w.restarts, role=w.role, worker=w.name)
            healthy.set(1.0 if w.healthy else 0.0, role=w.role, worker=w.name)
            inflight.set(w.inflight, role=w.role, worker=w.name)
        texts = [self.reg.render()]

        async def fetch(w: WorkerHandle) -> str:
            assert self.session is not None
            try:
                async with self.session.get(w.url + "/metrics", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                    return await r.text() if r.status == 200 else ""
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return ""

        texts += await asyncio.gather(*(fetch(w) for w in self.workers.values() if w.healthy))
        return web.Response(text=merge_prometheus(texts), content_type="text/plain")

    async def openapi(self, request: web.Request) -> web.Response:
        from appliance.serve.openapi_doc import openapi_document

        return web.json_response(openapi_document(self.cfg.served_model_name, self.cfg.max_body_bytes))

    # -- completions -----------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        # NOTE: the slot is taken before the body is read, so at most max_inflight bodies are buffered.
        if self.inflight >= self.cfg.max_inflight:
            self.m_requests.inc(endpoint=endpoint, outcome="rejected")
            raise oai.ApiError(429, f"server is at capacity ({self.cfg.max_inflight} requests in flight); retry later",
                               kind="rate_limit_error", headers={"Retry-After": "1"})
        self.inflight += 1
        try:
            body = oai.parse_json(await request.read())
            mml = self.max_model_len or 2048
            if endpoint == "chat":
                parsed = oai.parse_chat(body, self.tok, self.cfg.served_model_name, mml, defaults=self.cfg.generation)
            else:
                parsed = oai.parse_completion(body, self.tok, self.cfg.served_model_name, mml, self.vocab_size,
                                              defaults=self.cfg.generation)
            rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
            self.m_prompt.inc(len(parsed.prompt_ids))
            gen = self._generate(parsed, rid)
            if parsed.stream:
                return await self._stream(request, parsed, rid, gen)
            return await self._collect(parsed, rid, gen)
        finally:
            self.inflight -= 1

    def _generate(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Event | Outcome]:
        if self.cfg.mode == "unified":
            return self._unified(parsed, rid)
        return self._disagg(parsed, rid)

    def _pick(self, role: str, ids: list[int], exclude: set[str]) -> WorkerHandle:
        pool = [w for w in self.healthy(role) if w.name not in exclude]
        if not pool:
            raise oai.ApiError(503, f"no healthy {role} worker is available; retry later", kind="server_error",
                               headers={"Retry-After": "2"})
        return self.policies[role].pick(pool, ids)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.cluster_token}", "Content-Type": "application/json"}

    async def _post(self, w: WorkerHandle, path: str, payload: Any) -> aiohttp.ClientResponse:
        """POST to a worker and return the open response (registered: it is closed if ``w`` goes down)."""
        assert self.session is not None
        session = self.session
        data = msgspec.json.encode(payload)
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)

        async def post() -> aiohttp.ClientResponse:
            return await session.post(w.url + path, data=data, headers=self._headers(), timeout=timeout)

        try:
            resp = await self._unless_down(w, post)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise WorkerFailed(f"{w.name}: {type(exc).__name__}: {exc}") from None
        if resp.status == 400:
            text = await resp.text()
            resp.release()
            raise oai.ApiError(400, _message(text))
        if resp.status != 200:
            text = await resp.text()
            resp.release()
            kind = WorkerBusy if resp.status == 503 else WorkerFailed
            raise kind(f"{w.name} answered {resp.status}: {_message(text)}")
        self._open.setdefault(w.name, set()).add(resp)
        return resp

    def _done_with(self, w: WorkerHandle, resp: aiohttp.ClientResponse) -> None:
        self._open.get(w.name, set()).discard(resp)
        resp.close()

    async def _unless_down(self, w: WorkerHandle, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``fn()`` unless ``w`` is marked down first (then cancel it and raise `WorkerFailed`)."""
        down = self._down_event(w.name)
        if down.is_set():
            raise WorkerFailed(f"{w.name} is down")
        task = asyncio.ensure_future(fn())
        waiter = asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # NOTE: cancelled (the client left) in the same loop turn as the worker answered: nobody will
            # read or close that response, so close it now (the worker drops the request).
            if task.done() and not task.cancelled() and task.exception() is None:
                if isinstance(task.result(), aiohttp.ClientResponse):
                    task.result().close()
            raise
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise WorkerFailed(f"{w.name} went down (no answer to /health)")
        return task.result()

    async def _lines(self, resp: aiohttp.ClientResponse, who: str) -> AsyncIterator[Event]:
        """Events of a worker's NDJSON stream; a break or a stream that ends early is `WorkerFailed`."""
        try:
            async for line in resp.content:
                if line.strip():
                    try:
                        yield decode_event(line)
                    except msgspec.MsgspecError as exc:
                        raise WorkerFailed(f"{who} sent a malformed event: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WorkerFailed(f"{who} stream broke: {type(exc).__name__}: {exc}") from None
        raise WorkerFailed(f"{who} closed its stream before finishing")

    async def _next(self, lines: AsyncIterator[Event], who: str, deadline_s: float | None) -> Event:
        if deadline_s is None:
            return await anext(lines)
        try:
            async with asyncio.timeout(deadline_s):
                return await anext(lines)
        except TimeoutError:
            raise WorkerFailed(f"{who} sent nothing for {deadline_s:.0f} s") from None

    async def _unified(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Event | Outcome]:
        tried: set[str] = set()
        req = GenerateRequest(rid=rid, prompt_ids=parsed.prompt_ids, sampling=parsed.sampling)
        while True:
            w = self._pick("unified", parsed.prompt_ids, tried)
            try:
                resp = await self._post(w, "/internal/generate", req)
                break
            except WorkerFailed as exc:
                log.warning("retrying elsewhere: %s", exc)
                tried.add(w.name)
        self.policies["unified"].record(w, parsed.prompt_ids)
        w.inflight += 1
        lines = self._lines(resp, w.name)
        try:
            deadline = None  # NOTE: none before the first token: the request may queue behind others' prefills
            while True:
                ev = await self._next(lines, w.name, deadline)
                if ev.kind == "tokens":
                    deadline = self.cfg.stream_idle_s
                    yield ev
                elif ev.kind == "done":
                    yield Outcome(ev.finish_reason, ev.prompt_tokens, ev.cached_tokens)
                    return
                elif ev.kind == "moved":  # went on to another engine (adaptive mode): the caller follows it
                    yield ev
                    return
                elif ev.kind == "error":
                    raise oai.ApiError(ev.status or 502, ev.message, kind="server_error")
        finally:
            # NOTE: the abort first, before any await (see _disagg's finally).
            w.inflight -= 1
            self._done_with(w, resp)
            await lines.aclose()

    async def _reserve(self, d: WorkerHandle, dreq: DecodeRequest
                       ) -> tuple[aiohttp.ClientResponse, AsyncIterator[Event], Event]:
        """Open decode's stream and wait (``connect_timeout_s``) for its reservation."""
        resp: aiohttp.ClientResponse | None = None
        lines: AsyncIterator[Event] | None = None
        try:
            async with asyncio.timeout(self.cfg.connect_timeout_s):
                resp = await self._post(d, "/internal/decode", dreq)
                lines = self._lines(resp, d.name)
                ev = await anext(lines)
            if ev.kind != "reserved":
                raise WorkerFailed(f"{d.name}: {ev.message or 'no reservation'}")
            return resp, lines, ev
        except BaseException as exc:
            if lines is not None:
                await lines.aclose()
            if resp is not None:
                self._done_with(d, resp)
            if isinstance(exc, TimeoutError):
                raise WorkerFailed(f"{d.name} did not reserve within {self.cfg.connect_timeout_s:.0f} s") from None
            raise

    async def _prefill(self, p: WorkerHandle, preq: PrefillRequest) -> dict:
        resp = await self._post(p, "/internal/prefill", preq)
        try:
            first = await self._unless_down(p, resp.json)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise WorkerFailed(f"{p.name}: {type(exc).__name__}: {exc}") from None
        finally:
            self._done_with(p, resp)
        if not isinstance(first, dict) or not isinstance(first.get("token_ids"), list):
            raise WorkerFailed(f"{p.name} answered without a first token")
        return first

    async def _reserve_decode(self, ids: list[int], dreq: DecodeRequest):
        """``(engine, response, event lines, reservation)`` from the first decode engine that reserves;
        when every healthy one is up but full, pages free as decodes end, so wait (within ``kv_wait_s``),
        else 503."""
        tried: set[str] = set()
        busy_only, waited, deadline = True, False, time.monotonic() + self.cfg.kv_wait_s
        while True:
            d = self._pick("decode", ids, tried)
            try:
                return (d, *await self._reserve(d, dreq))
            except WorkerFailed as exc:
                busy_only = busy_only and isinstance(exc, WorkerBusy)
                log.log(logging.DEBUG if waited else logging.WARNING, "decode %s refused room: %s", d.name, exc)
                tried.add(d.name)
            if len(tried) < len(self.healthy("decode")):
                continue
            if not (busy_only and time.monotonic() < deadline):
                raise oai.ApiError(503, "no decode worker could reserve KV pages for this prompt; retry later",
                                   kind="server_error", headers={"Retry-After": "1"})
            waited = True
            await asyncio.sleep(KV_RETRY_S)
            tried.clear()

    async def _disagg(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Event | Outcome]:
        room = secrets.token_urlsafe(18)
        ids = parsed.prompt_ids
        p = self._pick("prefill", ids, set())
        # NOTE: the lease covers the prompts queued on that prefill engine too: a burst of prompts waits
        # its turn there, and a lease for this prompt alone expired in the queue (48 chat prompts at once).
        lease = min(self.cfg.lease_s + self.cfg.lease_per_token_s * (p.prefill_tokens + len(ids)), MAX_LEASE_S)
        dreq = DecodeRequest(rid=rid, room=room, prompt_ids=ids, sampling=parsed.sampling, prefill_tp=max(1, p.tp),
                             lease_s=lease)
        p.prefill_tokens += len(ids)  # counted from now on, so prompts arriving together see each other
        try:
            d, dresp, lines, reserved = await self._reserve_decode(ids, dreq)
        except BaseException:
            p.prefill_tokens -= len(ids)
            raise
        d.inflight += 1
        p.inflight += 1
        self.policies["prefill"].record(p, ids)
        self.policies["decode"].record(d, ids)
        preq = PrefillRequest(rid=rid, room=room, prompt_ids=ids, sampling=parsed.sampling,
                              dst_pages=reserved.pages, handles=reserved.handles)
        # NOTE: the handoff. Prefill's answer races decode's stream; either leg failing fails the request,
        # and closing the other leg makes that worker drop its part. Decode's lease bounds a stuck prefill.
        ptask = asyncio.ensure_future(self._prefill(p, preq))
        ptask.add_done_callback(lambda _t: setattr(p, "prefill_tokens", p.prefill_tokens - len(ids)))
        dtask = asyncio.ensure_future(anext(lines))
        cached = 0
        handoff_by = asyncio.get_running_loop().time() + lease + 2 * self.cfg.connect_timeout_s
        late = f"no KV handoff from {p.name} to {d.name} within the {lease:.1f} s lease"
        try:
            # NOTE: never yield inside asyncio.timeout (the consumer's awaits would run under it).
            try:
                async with asyncio.timeout_at(handoff_by):
                    await asyncio.wait({ptask, dtask}, return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                raise WorkerFailed(late) from None
            skip_first, prefill_first_at = False, 0.0
            if not dtask.done():  # prefill answered first: the client gets the token now
                first = ptask.result()  # raises WorkerFailed / ApiError when prefill failed
                prefill_first_at = time.monotonic()
                cached = int(first.get("cached_tokens", 0))
                yield Event(kind="tokens", token_ids=first["token_ids"], logprobs=first.get("logprobs", []))
                skip_first = True
            else:  # decode's first token came before prefill's answer: no handoff time was left to wait
                self.m_handoff_tail.observe(0.0)
            try:
                async with asyncio.timeout_at(handoff_by):
                    ev = await dtask
            except TimeoutError:
                raise WorkerFailed(late) from None
            while True:
                if ev.kind == "first" and skip_first:  # the client already has it, from prefill
                    self.m_handoff_tail.observe(time.monotonic() - prefill_first_at)
                elif ev.kind in ("first", "tokens"):
                    yield Event(kind="tokens", token_ids=ev.token_ids, logprobs=ev.logprobs)
                elif ev.kind == "done":
                    if ptask.done() and not ptask.cancelled() and ptask.exception() is None:
                        cached = int(ptask.result().get("cached_tokens", cached))
                    yield Outcome(ev.finish_reason, len(ids), cached)
                    return
                elif ev.kind == "moved":  # went on to another engine (adaptive mode): the caller follows it
                    yield Event(kind="moved", prompt_tokens=len(ids), cached_tokens=cached)
                    return
                elif ev.kind == "error":
                    raise oai.ApiError(ev.status or 502, ev.message, kind="server_error")
                ev = await self._next(lines, d.name, self.cfg.stream_idle_s)
        finally:
            # NOTE: the engines are told first, without an await: closing decode's stream (and cancelling the
            # prefill leg, which closes prefill's) is the abort. A client that vanished can cancel this task
            # after the cleanup began: aiohttp cancels the handler one loop turn after the write that found
            # the socket closing, so a cancel may land on the first await below, and what follows it is lost.
            p.inflight -= 1
            d.inflight -= 1
            legs = [t for t in (ptask, dtask) if not t.done()]
            for t in (ptask, dtask):
                t.add_done_callback(_retrieved)
                if not t.done():
                    t.cancel()
            self._done_with(d, dresp)
            if legs:  # NOTE: wait, not gather: a late cancel of this task must not cancel the legs a second time
                await asyncio.wait(legs)
            await lines.aclose()

    # -- responses -------------------------------------------------------------------------------
    async def _tokens(self, parsed: oai.ParsedRequest, gen: AsyncIterator[Event | Outcome], t0: float
                      ) -> AsyncIterator[tuple[str, list[dict], Outcome | None]]:
        """Text deltas from worker events; applies stop strings; records latency metrics."""
        text = IncrementalText(self.tok, parsed.sampling.stop)
        n_tokens = 0
        first_at = last_at = 0.0
        outcome = Outcome()
        try:
            async for ev in gen:
                if isinstance(ev, Outcome):
                    outcome = ev
                    break
                now = time.monotonic()
                if n_tokens == 0:
                    first_at = now
                    self.m_ttft.observe(now - t0)
                else:
                    self.m_itl.observe(now - last_at)
                last_at = now
                n_tokens += len(ev.token_ids)
                delta = text.feed(ev.token_ids)
                if text.stopped:
                    outcome = Outcome("stop", len(parsed.prompt_ids), 0)
                    yield delta, ev.logprobs, None
                    break
                yield delta, ev.logprobs, None
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        rest = text.finish()
        outcome.prompt_tokens = outcome.prompt_tokens or len(parsed.prompt_ids)
        self.m_tokens.inc(n_tokens)
        end = time.monotonic()
        self.m_e2e.observe(end - t0)
        if n_tokens > 1:
            self.m_tpot.observe((end - first_at) / (n_tokens - 1))
        yield rest, [], Outcome(outcome.finish_reason, outcome.prompt_tokens, outcome.cached_tokens, n_tokens)

    async def _collect(self, parsed: oai.ParsedRequest, rid: str, gen: AsyncIterator[Event | Outcome]
                       ) -> web.Response:
        t0 = time.monotonic()
        parts: list[str] = []
        lps: list[dict] = []
        n = 0
        final = Outcome()
        try:
            async for delta, lp, outcome in self._tokens(parsed, gen, t0):
                parts.append(delta)
                lps.extend(lp)
                if outcome is not None:
                    final = outcome
                    n = outcome.completion_tokens
        except WorkerFailed as exc:
            self.m_requests.inc(endpoint=parsed.endpoint, outcome="error")
            raise oai.ApiError(502, f"worker failed: {exc}", kind="server_error") from None
        self.m_requests.inc(endpoint=parsed.endpoint, outcome="ok")
        use = oai.usage(final.prompt_tokens, n, final.cached_tokens)
        return web.json_response(oai.full_response(parsed, rid, "".join(parts), final.finish_reason, use,
                                                   oai.format_logprobs(parsed, self.tok, lps)))

    async def _stream(self, request: web.Request, parsed: oai.ParsedRequest, rid: str,
                      gen: AsyncIterator[Event | Outcome]) -> web.StreamResponse:
        t0 = time.monotonic()
        created = int(time.time())
        resp: web.StreamResponse | None = None
        first = True
        tokens_it = self._tokens(parsed, gen, t0)
        try:
            async for delta, lp, outcome in tokens_it:
                if resp is None:
                    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                       "X-Request-Id": rid})
                    await resp.prepare(request)
                if delta or lp or first:
                    logprobs = oai.format_logprobs(parsed, self.tok, lp)
                    await self._sse(resp, oai.chunk(parsed, rid, created, delta, None, first, logprobs))
                    first = False
                if outcome is not None:
                    await self._sse(resp, oai.chunk(parsed, rid, created, None if parsed.endpoint == "chat" else "",
                                               outcome.finish_reason))
                    if parsed.include_usage:
                        use = oai.usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)
                        await self._sse(resp, oai.usage_chunk(parsed, rid, created, use))
            assert resp is not None  # _tokens always yields a last item with the outcome
            await self._done(resp)
            self.m_requests.inc(endpoint=parsed.endpoint, outcome="ok")
        except (WorkerFailed, oai.ApiError) as exc:
            self.m_requests.inc(endpoint=parsed.endpoint, outcome="error")
            if resp is None:  # nothing sent yet: a plain HTTP error
                if isinstance(exc, oai.ApiError):
                    raise
                raise oai.ApiError(502, f"worker failed: {exc}", kind="server_error") from None
            err = exc if isinstance(exc, oai.ApiError) else oai.ApiError(502, f"worker failed: {exc}",
                                                                          kind="server_error")
            self.m_errors.inc(kind=str(err.status))  # after the first byte: the middleware never sees it
            await self._sse(resp, err.body())
            await self._done(resp)
        except (ConnectionError, asyncio.CancelledError):  # reset, broken pipe, stalled: the client is gone
            self.m_requests.inc(endpoint=parsed.endpoint, outcome="client_gone")
            raise
        finally:
            # NOTE: on every way out, so a request whose client vanished is aborted on its engines now
            # (a dangling generator would keep decoding until the answer's end).
            await tokens_it.aclose()
        return resp

    async def _done(self, resp: web.StreamResponse) -> None:
        await write_within(resp, b"data: [DONE]\n\n", self.cfg.client_stall_s)
        await eof_within(resp, self.cfg.client_stall_s)

    async def _sse(self, resp: web.StreamResponse, obj: dict) -> None:
        data = b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
        await write_within(resp, data, self.cfg.client_stall_s)


def _retrieved(task: asyncio.Future) -> None:
    """Mark a leg's outcome as seen (its error, if any, was handled or superseded by the request's own)."""
    if not task.cancelled():
        task.exception()


def _message(text: str) -> str:
    try:
        body = json.loads(text)
        err = body.get("error")
        return err.get("message", str(err)) if isinstance(err, dict) else str(err or text)
    except (ValueError, AttributeError):
        return text.strip()[:500]

"""The router: OpenAI API in front, prefill/decode (or unified) workers behind. Needs no GPU.

Disaggregated request lifecycle (DESIGN §3): pick a prefill and a decode engine, mint an
unguessable room id, open the decode stream (decode reserves pages or refuses at once), send the
prompt to prefill with decode's page ids and pool handle, stream prefill's first token to the
client as soon as it is sampled, then relay decode's tokens. Retries happen only before the first
byte reaches the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
from aiohttp import web

from appliance.serve import openai_api as oai
from appliance.serve.detok import IncrementalText
from appliance.serve.metrics import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, Registry
from appliance.serve.policies import WorkerHandle, make_policy
from appliance.serve.protocol import DecodeRequest, Event, GenerateRequest, PrefillRequest, decode_event

log = logging.getLogger("pdbox.router")
LATENCY = REQUEST_LATENCY_BUCKETS
TOKEN_LATENCY = TOKEN_LATENCY_BUCKETS


@dataclass(frozen=True)
class RouterConfig:
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

    def __post_init__(self) -> None:
        if self.mode not in ("disagg", "unified", "auto"):
            raise ValueError(f"mode must be disagg, unified or auto, got {self.mode!r}")


class WorkerFailed(Exception):
    """A worker broke before the client saw a byte (the router may retry elsewhere)."""


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
        self.m_tokens = r.counter("pdbox_output_tokens_total", "Tokens streamed to clients")
        self.m_prompt = r.counter("pdbox_prompt_tokens_total", "Prompt tokens received")
        self.m_restarts = r.counter("pdbox_worker_restarts_total", "Times the launcher restarted a worker")
        self._health_task: asyncio.Task | None = None

    # -- workers ---------------------------------------------------------------------------------
    def add_worker(self, w: WorkerHandle) -> None:
        self.workers[w.name] = w

    def remove_worker(self, name: str) -> None:
        self.workers.pop(name, None)

    def healthy(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.role == role and w.healthy]

    async def refresh(self, w: WorkerHandle) -> None:
        assert self.session is not None
        try:
            async with self.session.get(w.url + "/load", timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientError(f"status {resp.status}")
                info = await resp.json()
            w.load = info
            w.pid = info.get("pid", w.pid)
            w.handle = info.get("handle", "")
            w.tp = info.get("tp", w.tp)
            w.transport = info.get("transport", w.transport)
            w.last_seen = time.monotonic()
            w.healthy = True
            mml = int(info.get("max_model_len", 0))
            if mml and (not self.max_model_len or mml < self.max_model_len):
                self.max_model_len = mml
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            if time.monotonic() - w.last_seen > self.cfg.unhealthy_after_s:
                w.healthy = False

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.refresh(w) for w in list(self.workers.values())))
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

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.cfg.api_key and request.path != "/health":
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got, f"Bearer {self.cfg.api_key}"):
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

        return web.json_response(openapi_document(self.cfg.served_model_name))

    # -- completions -----------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        if self.inflight >= self.cfg.max_inflight:
            raise oai.ApiError(429, f"server is at capacity ({self.cfg.max_inflight} requests in flight); retry later",
                               kind="rate_limit_error", headers={"Retry-After": "1"})
        body = oai.parse_json(await request.read())
        mml = self.max_model_len or 2048
        if endpoint == "chat":
            parsed = oai.parse_chat(body, self.tok, self.cfg.served_model_name, mml)
        else:
            parsed = oai.parse_completion(body, self.tok, self.cfg.served_model_name, mml, self.vocab_size)
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        self.inflight += 1
        self.m_prompt.inc(len(parsed.prompt_ids))
        try:
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
        assert self.session is not None
        try:
            resp = await self.session.post(
                w.url + path, data=msgspec.json.encode(payload), headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise WorkerFailed(f"{w.name}: {exc}") from None
        if resp.status == 400:
            text = await resp.text()
            resp.release()
            raise oai.ApiError(400, _message(text))
        if resp.status != 200:
            text = await resp.text()
            resp.release()
            raise WorkerFailed(f"{w.name} answered {resp.status}: {_message(text)}")
        return resp

    async def _lines(self, resp: aiohttp.ClientResponse, who: str) -> AsyncIterator[Event]:
        try:
            async for line in resp.content:
                if line.strip():
                    yield decode_event(line)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise WorkerFailed(f"{who} stream broke: {exc}") from None
        raise WorkerFailed(f"{who} closed its stream before finishing")

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
        try:
            async for ev in self._lines(resp, w.name):
                if ev.kind == "tokens":
                    yield ev
                elif ev.kind == "done":
                    yield Outcome(ev.finish_reason, ev.prompt_tokens, ev.cached_tokens)
                    return
                elif ev.kind == "error":
                    raise oai.ApiError(ev.status or 502, ev.message, kind="server_error")
        finally:
            w.inflight -= 1
            resp.close()

    async def _disagg(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Event | Outcome]:
        room = secrets.token_urlsafe(18)
        ids = parsed.prompt_ids
        p = self._pick("prefill", ids, set())
        lease = self.cfg.lease_s + self.cfg.lease_per_token_s * len(ids)
        dreq = DecodeRequest(rid=rid, room=room, prompt_ids=ids, sampling=parsed.sampling, prefill_tp=max(1, p.tp),
                             lease_s=lease)
        tried: set[str] = set()
        while True:
            d = self._pick("decode", ids, tried)
            try:
                dresp = await self._post(d, "/internal/decode", dreq)
                lines = self._lines(dresp, d.name)
                reserved = await asyncio.wait_for(anext(lines), self.cfg.connect_timeout_s)
                if reserved.kind != "reserved":
                    dresp.close()
                    raise WorkerFailed(f"{d.name}: {reserved.message or 'no reservation'}")
                break
            except (WorkerFailed, asyncio.TimeoutError, StopAsyncIteration) as exc:
                log.warning("decode %s refused room: %s", d.name, exc)
                tried.add(d.name)
                if len(tried) >= len(self.healthy("decode")):
                    raise oai.ApiError(503, "no decode worker could reserve KV pages for this prompt; retry later",
                                       kind="server_error", headers={"Retry-After": "1"}) from None
        d.inflight += 1
        p.inflight += 1
        self.policies["prefill"].record(p, ids)
        self.policies["decode"].record(d, ids)
        try:
            preq = PrefillRequest(rid=rid, room=room, prompt_ids=ids, sampling=parsed.sampling,
                                  dst_pages=reserved.pages, handles=reserved.handles)
            try:
                presp = await self._post(p, "/internal/prefill", preq)
                try:
                    first = await presp.json()
                finally:
                    presp.release()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                raise WorkerFailed(f"{p.name}: {exc}") from None
            finally:
                p.inflight -= 1
            yield Event(kind="tokens", token_ids=first["token_ids"], logprobs=first.get("logprobs", []))
            cached = int(first.get("cached_tokens", 0))
            async for ev in lines:
                if ev.kind == "first":
                    continue  # the client already has it, from prefill
                if ev.kind == "tokens":
                    yield ev
                elif ev.kind == "done":
                    yield Outcome(ev.finish_reason, len(ids), cached)
                    return
                elif ev.kind == "error":
                    raise oai.ApiError(ev.status or 502, ev.message, kind="server_error")
        finally:
            d.inflight -= 1
            dresp.close()

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
                    await _sse(resp, oai.chunk(parsed, rid, created, delta, None, first, logprobs))
                    first = False
                if outcome is not None:
                    await _sse(resp, oai.chunk(parsed, rid, created, None if parsed.endpoint == "chat" else "",
                                               outcome.finish_reason))
                    if parsed.include_usage:
                        use = oai.usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)
                        await _sse(resp, oai.usage_chunk(parsed, rid, created, use))
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
            await _sse(resp, err.body())
        except (ConnectionResetError, asyncio.CancelledError):
            self.m_requests.inc(endpoint=parsed.endpoint, outcome="client_gone")
            await tokens_it.aclose()
            raise
        assert resp is not None
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _sse(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")


def _message(text: str) -> str:
    try:
        body = json.loads(text)
        err = body.get("error")
        return err.get("message", str(err)) if isinstance(err, dict) else str(err or text)
    except (ValueError, AttributeError):
        return text.strip()[:500]

"""The router: OpenAI API in front, prefill/decode (or unified) workers behind. Needs no GPU.

This module is the HTTP layer (the aiohttp app, its middleware and handlers); the parts behind it:

- :mod:`~appliance.serve.worker_pool`: the workers, their health loop, marking one down;
- :mod:`~appliance.serve.worker_client`: typed calls to one worker (generate, reserve, prefill, move);
- :mod:`~appliance.serve.placement`: where a request runs (fixed; :mod:`~appliance.serve.adaptive_placement`
  for ``--mode auto``, which owns the :mod:`~appliance.serve.decode_mover`);
- :mod:`~appliance.serve.dispatch`: one request on its engines (unified, or the disaggregated handoff);
- :mod:`~appliance.serve.relay`: worker events to the client's tokens, written once for every path;
- :mod:`~appliance.serve.responses`: OpenAI JSON and SSE out.

Deadlines (every wait has one; see `RouterConfig`): a worker's decode reservation answers within
``connect_timeout_s``; prefill must hand the KV over within the room's lease (``lease_s`` +
``lease_per_token_s`` per prompt token queued on that prefill engine), which the router renews while
the prefill leg is open and its worker healthy (a queued prompt may wait longer than any estimate),
up to ``MAX_LEASE_S``; after it, decode fails the room and the router fails the request and cancels
the prefill leg; a worker that stops answering ``/health`` for
``unhealthy_after_s`` (SIGSTOP, a hung host) is marked down and every request it holds fails at
once (under ``pdbox up``, one silent for ``HUNG_KILL_S`` is then killed and restarted); a worker
stream that is silent for ``stream_idle_s`` after the first token fails; no request
lives past ``request_timeout_s``; a streaming client that accepts no bytes for ``client_stall_s``
is dropped like one that disconnected (its request is aborted on every engine). A failure
before the first byte is an HTTP error (502/503); after it, an SSE ``error`` event followed by ``[DONE]``.
Retries happen only before the first byte reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from appliance.serve import openai_api as oai
from appliance.serve import responses_api, responses_out, tokenize_api
from appliance.serve.adaptive_placement import AdaptivePlacement
from appliance.serve.auth import bearer_ok
from appliance.serve.dispatch import Dispatcher
from appliance.serve.load_report import listed
from appliance.serve.metrics_merge import merge_prometheus
from appliance.serve.placement import FixedPlacement, Placement
from appliance.serve.response_store import ResponseStore
from appliance.serve.responses import ResponseWriter
from appliance.serve.router_config import AutoConfig, RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.worker_client import WorkerClient, WorkerFailed
from appliance.serve.worker_pool import WorkerPool

log = logging.getLogger("pdbox.router")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Router:
    """``auto`` (``--mode auto`` only; default `AutoConfig()`) and ``clock`` go to the adaptive placement."""

    def __init__(self, cfg: RouterConfig, tokenizer: Any, vocab_size: int, max_model_len: int = 0, *,
                 auto: AutoConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if auto is not None and cfg.mode != "auto":
            raise ValueError(f"an AutoConfig needs mode auto, not {cfg.mode!r}")
        self.cfg = cfg
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self.metrics = RouterMetrics()
        self.pool = WorkerPool(cfg, max_model_len)
        self.client = WorkerClient(cfg, self.pool)
        self.placement: Placement
        if cfg.mode == "auto":
            self.placement = AdaptivePlacement(cfg, auto or AutoConfig(), self.pool, self.client, self.metrics, clock)
        else:
            self.placement = FixedPlacement(cfg, self.pool, Dispatcher(cfg, self.client, self.metrics,
                                                                       self.pool.healthy))
        self.answers = ResponseWriter(cfg, tokenizer, self.metrics)
        self.stored = ResponseStore(cfg.responses_store)  # /v1/responses' store and previous_response_id
        self.inflight = 0
        self.started = time.time()
        self._health_task: asyncio.Task | None = None

    # -- app ---------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=self.cfg.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/responses/{rid}", self.stored_response)
        app.router.add_delete("/v1/responses/{rid}", self.delete_response)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/workers", self.list_workers)
        app.router.add_get("/openapi.json", self.openapi)
        if isinstance(self.placement, AdaptivePlacement):
            app.router.add_post("/workers/{name}/leaning", self.set_leaning)

        async def lifecycle(app: web.Application):
            await self.pool.start()
            self._health_task = asyncio.create_task(self.placement.health_loop())
            yield
            self._health_task.cancel()
            await self.pool.close()

        app.cleanup_ctx.append(lifecycle)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        errors = self.metrics.errors
        try:
            return await handler(request)
        except oai.ApiError as exc:
            errors.inc(kind=str(exc.status))
            return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
        except web.HTTPRequestEntityTooLarge:
            errors.inc(kind="413")
            e = oai.ApiError(413, f"request body is larger than {self.cfg.max_body_bytes} bytes")
            return web.json_response(e.body(), status=413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            e = oai.ApiError(exc.status, exc.reason or "error", kind="invalid_request_error")
            return web.json_response(e.body(), status=exc.status)
        except WorkerFailed as exc:  # a worker broke before the client saw a byte
            errors.inc(kind="502")
            e = oai.ApiError(502, f"worker failed: {exc}", kind="server_error")
            return web.json_response(e.body(), status=502)
        except Exception:  # a router bug: still an OpenAI-shaped answer, and a traceback in the log
            log.exception("unhandled error serving %s %s", request.method, request.path)
            errors.inc(kind="500")
            e = oai.ApiError(500, "internal router error (logged)", kind="server_error")
            return web.json_response(e.body(), status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # /internal/* (Slurm worker registration) is gated by the cluster token in its own sub-app.
        if self.cfg.api_key and request.path != "/health" and not request.path.startswith("/internal/"):
            if not bearer_ok(request.headers, self.cfg.api_key):
                raise oai.ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                   kind="authentication_error")
        return await handler(request)

    # -- handlers ----------------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.cfg.served_model_name, "object": "model", "created": int(self.started), "owned_by": "pdbox",
                "max_model_len": self.pool.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}`` (the openai client's ``models.retrieve``)."""
        oai.check_model({"model": request.match_info["model"]}, self.cfg.served_model_name)
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        roles, healthy = self.placement.roles(), self.placement.healthy
        ok = all(healthy(r) for r in roles)
        return web.json_response({"status": "ok" if ok else "degraded", "workers": {r: len(healthy(r)) for r in roles}},
                                 status=200 if ok else 503)

    async def list_workers(self, request: web.Request) -> web.Response:
        out = []
        for w in self.pool.workers.values():
            out.append({"name": w.name, "role": w.role, "url": w.url, "pid": w.pid, "devices": w.devices, "tp": w.tp,
                        "transport": w.transport, "healthy": w.healthy, "inflight": w.inflight,
                        "restarts": w.restarts, "load": listed(w.load),
                        **self.placement.describe(w)})
        return web.json_response({"mode": self.cfg.mode, "model": self.cfg.served_model_name, "workers": out,
                                  **self.placement.summary()})

    async def set_leaning(self, request: web.Request) -> web.Response:
        """Operator (``--mode auto``): lean an engine ``prefill`` or ``decode`` now (see
        :meth:`AdaptivePlacement.set_leaning`)."""
        assert isinstance(self.placement, AdaptivePlacement)
        name = request.match_info["name"]
        if name not in self.pool.workers:
            raise oai.ApiError(404, f"no engine named {name!r}; engines: {', '.join(self.pool.workers)}",
                               kind="not_found_error")
        try:
            body = await request.json()
        except ValueError as exc:
            raise oai.ApiError(400, f"body must be JSON like {{\"leaning\": \"prefill\"}}: {exc}") from None
        leaning = body.get("leaning") if isinstance(body, dict) else None
        if leaning not in ("prefill", "decode"):
            raise oai.ApiError(400, f"leaning must be \"prefill\" or \"decode\", got {leaning!r}")
        moved = await self.placement.set_leaning(name, leaning)
        return web.json_response({"name": name, "leaning": leaning, "moved": moved})

    async def metrics_text(self, request: web.Request) -> web.Response:
        texts = [self.metrics.render(self.pool.workers.values(), self.inflight, time.time() - self.started)]
        texts += await asyncio.gather(*(self.client.metrics_text(w) for w in self.pool.workers.values() if w.healthy))
        return web.Response(text=merge_prometheus(texts), content_type="text/plain")

    async def openapi(self, request: web.Request) -> web.Response:
        from appliance.serve.openapi_doc import openapi_document

        return web.json_response(openapi_document(self.cfg.served_model_name, self.cfg.max_body_bytes))

    # -- completions -------------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "responses")

    async def stored_response(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        stored = self.stored.get(rid)
        if stored is None:
            raise oai.ApiError(404, f"no stored response {rid!r} (this server keeps the last "
                                    f"{self.cfg.responses_store}, in memory)", "response_id")
        return web.json_response(stored.response)

    async def delete_response(self, request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        if not self.stored.delete(rid):
            raise oai.ApiError(404, f"no stored response {rid!r}", "response_id")
        return web.json_response({"id": rid, "object": "response", "deleted": True})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = oai.parse_json(await request.read())
        mml = self.pool.max_model_len or 2048
        return web.json_response(tokenize_api.tokenize(body, self.tok, self.cfg.served_model_name, mml))

    async def detokenize(self, request: web.Request) -> web.Response:
        body = oai.parse_json(await request.read())
        return web.json_response(tokenize_api.detokenize(body, self.tok, self.cfg.served_model_name, self.vocab_size))

    def _keeper(self, rid: str, body: dict, previous: tuple[dict, ...]) -> responses_out.Keep:
        """Stores response ``rid`` once it is answered: the Response and its conversation."""
        return lambda response: self.stored.put(rid, response, [*previous, *responses_api.input_messages(body)])

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        # NOTE: the slot is taken before the body is read, so at most max_inflight bodies are buffered.
        if self.inflight >= self.cfg.max_inflight:
            self.metrics.requests.inc(endpoint=endpoint, outcome="rejected")
            raise oai.ApiError(429, f"server is at capacity ({self.cfg.max_inflight} requests in flight); retry later",
                               kind="rate_limit_error", headers={"Retry-After": "1"})
        self.inflight += 1
        held = 1  # in-flight slots this request holds: one per prompt
        try:
            body = oai.parse_json(await request.read())
            mml = self.pool.max_model_len or 2048
            if endpoint == "chat":
                requests = [oai.parse_chat(body, self.tok, self.cfg.served_model_name, mml,
                                           defaults=self.cfg.generation)]
            elif endpoint == "responses":
                previous = self.stored.previous(body)
                keep = self.stored.wants(body)
                requests = [responses_api.parse(body, self.tok, self.cfg.served_model_name, mml, previous,
                                                defaults=self.cfg.generation)]
            else:
                requests = [oai.parse_completion(b, self.tok, self.cfg.served_model_name, mml, self.vocab_size,
                                                 defaults=self.cfg.generation) for b in oai.split_prompts(body)]
            if self.inflight + len(requests) - 1 > self.cfg.max_inflight:
                self.metrics.requests.inc(endpoint=endpoint, outcome="rejected")
                raise oai.ApiError(429, f"{len(requests)} prompts would put the server over its capacity "
                                        f"({self.cfg.max_inflight} requests in flight); retry later or send fewer",
                                   kind="rate_limit_error", headers={"Retry-After": "1"})
            self.inflight += len(requests) - 1
            held = len(requests)
            rid = {"chat": "chatcmpl-", "completions": "cmpl-", "responses": "resp_"}[endpoint] + secrets.token_hex(12)
            parts = []
            for k, parsed in enumerate(requests):
                self.metrics.prompt.inc(len(parsed.prompt_ids))
                parts.append((parsed, self.placement.generate(parsed, rid if k == 0 else f"{rid}-{k}")))
            first = requests[0]
            if endpoint == "responses":
                kept = self._keeper(rid, body, previous) if keep else None
                if first.stream:
                    events = responses_out.ResponsesStream(rid, first, body, self.tok, kept)
                    return await self.answers.stream(request, parts, rid, events)
                return await self.answers.collect(parts, rid, lambda results: responses_out.whole(
                    rid, first, body, results[0][0][0], results[0][1], self.tok, kept))
            if first.stream:
                return await self.answers.stream(request, parts, rid)
            return await self.answers.collect(parts, rid)
        finally:
            self.inflight -= held

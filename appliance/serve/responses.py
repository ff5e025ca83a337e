"""The client's answer: worker events in, OpenAI JSON or SSE out, with the latency metrics.

`ResponseWriter.stream` writes Server-Sent Events (``data: {...}``, then ``data: [DONE]``); a failure
before the first byte is an HTTP error (502/503), after it an SSE ``error`` event followed by
``[DONE]``. A streaming client that accepts no bytes for ``client_stall_s`` is dropped like one that
disconnected; on every way out the events' generator is closed, which aborts the request on its engines.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from aiohttp import web

from appliance.serve import openai_api as oai
from appliance.serve.choices import Choice, Piece
from appliance.serve.protocol import Tokens
from appliance.serve.relay import Outcome, Relayed
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.stream_write import eof_within, write_within
from appliance.serve.worker_client import WorkerFailed

Events = AsyncIterator[Relayed]


class ResponseWriter:
    def __init__(self, cfg: RouterConfig, tokenizer: Any, metrics: RouterMetrics) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.m = metrics

    def _choices(self, parsed: oai.ParsedRequest) -> list[Choice]:
        return [Choice(i, parsed, self.tok) for i in range(parsed.n)]

    async def _pieces(self, parsed: oai.ParsedRequest, gen: Events, t0: float, choices: list[Choice]
                      ) -> AsyncGenerator[tuple[list[Piece], Outcome | None], None]:
        """Each choice's pieces from worker events (``index``: the sample), then the ends and the `Outcome`
        last; applies stop strings; records latency metrics."""
        m = self.m
        n_tokens = 0
        first_at = last_at = 0.0
        outcome = Outcome()
        try:
            async for ev in gen:
                if isinstance(ev, Outcome):
                    outcome = ev
                    break
                if not isinstance(ev, Tokens):
                    continue  # a Moved: the placement follows it and never passes it on
                now = time.monotonic()
                if n_tokens == 0:
                    first_at = now
                    m.ttft.observe(now - t0)
                elif ev.token_ids:
                    m.itl.observe(now - last_at)
                last_at = now
                n_tokens += len(ev.token_ids)
                if not 0 <= ev.index < len(choices) or choices[ev.index].over:
                    continue  # a sample a stop string already ended here
                c = choices[ev.index]
                yield [c.feed(ev.token_ids, ev.logprobs, ev.finish_reason if parsed.n > 1 else None)], None
                if parsed.n == 1 and c.over:  # a stop string: the engine's request is aborted below
                    outcome = Outcome("stop", len(parsed.prompt_ids), 0)
                    break
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        ends = [c.end(outcome.finish_reason) for c in choices if not c.over]
        outcome.prompt_tokens = outcome.prompt_tokens or len(parsed.prompt_ids)
        m.tokens.inc(n_tokens)
        end = time.monotonic()
        m.e2e.observe(end - t0)
        if n_tokens > 1:
            m.tpot.observe((end - first_at) / (n_tokens - 1))
        yield ends, Outcome(outcome.finish_reason, outcome.prompt_tokens, outcome.cached_tokens, n_tokens)

    async def collect(self, parsed: oai.ParsedRequest, rid: str, gen: Events) -> web.Response:
        """The whole answer as one JSON body."""
        t0 = time.monotonic()
        final = Outcome()
        choices = self._choices(parsed)
        try:
            async for _, outcome in self._pieces(parsed, gen, t0, choices):
                if outcome is not None:
                    final = outcome
        except WorkerFailed as exc:
            self.m.requests.inc(endpoint=parsed.endpoint, outcome="error")
            raise oai.ApiError(502, f"worker failed: {exc}", kind="server_error") from None
        self.m.requests.inc(endpoint=parsed.endpoint, outcome="ok")
        use = oai.usage(final.prompt_tokens, final.completion_tokens, final.cached_tokens)
        if parsed.keep is not None:  # best_of: the likeliest samples (summed logprob of their tokens)
            choices = sorted(choices, key=lambda c: -sum(e["logprob"] for e in c.logprobs))[:parsed.keep]
            for i, c in enumerate(choices):
                c.index = i
        return web.json_response(oai.full_response(parsed, rid, [c.body(parsed, self.tok) for c in choices], use))

    async def stream(self, request: web.Request, parsed: oai.ParsedRequest, rid: str,
                     gen: Events) -> web.StreamResponse:
        """The answer as Server-Sent Events, each chunk as soon as its tokens arrive."""
        t0 = time.monotonic()
        created = int(time.time())
        resp: web.StreamResponse | None = None
        started: set[int] = set()  # choices whose first chunk (with the role) went out
        chat = parsed.endpoint == "chat"
        pieces_it = self._pieces(parsed, gen, t0, self._choices(parsed))
        try:
            async for pieces, outcome in pieces_it:
                if resp is None:
                    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                       "X-Request-Id": rid})
                    await resp.prepare(request)
                for p in pieces:
                    first = p.index not in started
                    if p.text or p.logprobs or first:
                        logprobs = oai.format_logprobs(parsed, self.tok, p.logprobs)
                        await self._sse(resp, oai.chunk(parsed, rid, created, p.text, None, first, logprobs, p.index))
                        started.add(p.index)
                    if p.tool_calls:
                        await self._sse(resp, oai.chunk(parsed, rid, created, None, None, index=p.index,
                                                        tool_calls=p.tool_calls))
                    if p.finish is not None:
                        await self._sse(resp, oai.chunk(parsed, rid, created, None if chat else "", p.finish,
                                                        index=p.index))
                if outcome is not None and parsed.include_usage:
                    use = oai.usage(outcome.prompt_tokens, outcome.completion_tokens, outcome.cached_tokens)
                    await self._sse(resp, oai.usage_chunk(parsed, rid, created, use))
            assert resp is not None  # _pieces always yields a last item with the outcome
            await self._done(resp)
            self.m.requests.inc(endpoint=parsed.endpoint, outcome="ok")
        except (WorkerFailed, oai.ApiError) as exc:
            self.m.requests.inc(endpoint=parsed.endpoint, outcome="error")
            if resp is None:  # nothing sent yet: a plain HTTP error
                if isinstance(exc, oai.ApiError):
                    raise
                raise oai.ApiError(502, f"worker failed: {exc}", kind="server_error") from None
            err = exc if isinstance(exc, oai.ApiError) else oai.ApiError(502, f"worker failed: {exc}",
                                                                          kind="server_error")
            self.m.errors.inc(kind=str(err.status))  # after the first byte: the middleware never sees it
            await self._sse(resp, err.body())
            await self._done(resp)
        except (ConnectionError, asyncio.CancelledError):  # reset, broken pipe, stalled: the client is gone
            self.m.requests.inc(endpoint=parsed.endpoint, outcome="client_gone")
            raise
        finally:
            # NOTE: on every way out, so a request whose client vanished is aborted on its engines now
            # (a dangling generator would keep decoding until the answer's end).
            await pieces_it.aclose()
        return resp

    async def _done(self, resp: web.StreamResponse) -> None:
        await write_within(resp, b"data: [DONE]\n\n", self.cfg.client_stall_s)
        await eof_within(resp, self.cfg.client_stall_s)

    async def _sse(self, resp: web.StreamResponse, obj: dict) -> None:
        data = b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
        await write_within(resp, data, self.cfg.client_stall_s)

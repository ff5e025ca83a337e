"""The client's answer: worker events in, OpenAI JSON or SSE out, with the latency metrics.

`ResponseWriter.stream` writes Server-Sent Events (``data: {...}``, then ``data: [DONE]``); a failure
before the first byte is an HTTP error (502/503), after it an SSE ``error`` event followed by
``[DONE]``. A streaming client that accepts no bytes for ``client_stall_s`` is dropped like one that
disconnected; on every way out the events' generator is closed, which aborts the request on its engines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import web

from appliance.serve import openai_api as oai
from appliance.serve.choices import Choice, Piece
from appliance.serve.merge_streams import merged
from appliance.serve.protocol import Tokens
from appliance.serve.relay import Outcome, Relayed
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.sse_formats import ChatStream, StreamFormat, totals
from appliance.serve.stream_write import eof_within, write_within
from appliance.serve.worker_client import WorkerFailed

Events = AsyncIterator[Relayed]
Render = Callable[[list[tuple[list[Choice], Outcome]]], dict[str, Any]]
T = TypeVar("T")


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
                if ev.prompt_logprobs is not None and parsed.echo is not None:  # with the first token
                    for c in choices:
                        c.prompt_scores = oai.echoed_prompt(parsed.prompt_ids, ev.prompt_logprobs)
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

    async def _collected(self, parsed: oai.ParsedRequest, gen: Events, t0: float) -> tuple[list[Choice], Outcome]:
        """One prompt's choices, whole (``best_of``: the likeliest ``keep``), and its outcome."""
        final = Outcome()
        choices = self._choices(parsed)
        async for _, outcome in self._pieces(parsed, gen, t0, choices):
            if outcome is not None:
                final = outcome
        if parsed.keep is not None:  # best_of: the likeliest samples (summed logprob of their tokens)
            choices = sorted(choices, key=lambda c: -sum(e["logprob"] for e in c.logprobs))[:parsed.keep]
            for i, c in enumerate(choices):
                c.index = i
        return choices, final

    async def collect(self, parts: list[tuple[oai.ParsedRequest, Events]], rid: str,
                      render: Render | None = None) -> web.Response:
        """The whole answer as one JSON body: by default chat's or completions' (each prompt's choices after
        the previous prompt's), else what ``render`` makes of each prompt's choices and outcome."""
        t0 = time.monotonic()
        parsed = parts[0][0]
        tasks = [asyncio.ensure_future(self._collected(p, gen, t0)) for p, gen in parts]
        try:
            results = await asyncio.gather(*tasks)
        except WorkerFailed as exc:
            self.m.requests.inc(endpoint=parsed.endpoint, outcome="error")
            raise oai.ApiError(502, f"worker failed: {exc}", kind="server_error") from None
        finally:  # one prompt failed (or the client went): the others stop too, aborted on their engines
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.m.requests.inc(endpoint=parsed.endpoint, outcome="ok")
        if render is not None:
            return web.json_response(render(results))
        bodies = []
        for (p, _), (choices, _) in zip(parts, results, strict=True):
            offset = len(bodies)
            for c in choices:
                c.index += offset
            bodies += [c.body(p, self.tok) for c in choices]
        use = oai.usage(*totals([outcome for _, outcome in results]))
        return web.json_response(oai.full_response(parsed, rid, bodies, use))

    async def stream(self, request: web.Request, parts: list[tuple[oai.ParsedRequest, Events]],
                     rid: str, fmt: StreamFormat | None = None) -> web.StreamResponse:
        """The answer as Server-Sent Events in ``fmt`` (default: chat and completions chunks), each as soon
        as its tokens arrive; several prompts' pieces interleave."""
        t0 = time.monotonic()
        resp: web.StreamResponse | None = None
        parsed = parts[0][0]
        fmt = fmt or ChatStream(self.tok, [p for p, _ in parts], rid)
        streams = [self._pieces(p, gen, t0, self._choices(p)) for p, gen in parts]
        pieces_it = merged(streams) if len(streams) > 1 else _tagged(streams[0])
        outcomes: list[Outcome] = []
        try:
            async for k, (pieces, outcome) in pieces_it:
                if resp is None:
                    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                       "X-Request-Id": rid})
                    await resp.prepare(request)
                    await self._write(resp, fmt.opening())
                await self._write(resp, fmt.pieces(k, pieces))
                if outcome is not None:
                    outcomes.append(outcome)
            assert resp is not None  # each prompt's pieces end with an item carrying its outcome
            await self._write(resp, fmt.closing(outcomes))
            await eof_within(resp, self.cfg.client_stall_s)
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
            await self._write(resp, fmt.failure(err))
            await eof_within(resp, self.cfg.client_stall_s)
        except (ConnectionError, asyncio.CancelledError):  # reset, broken pipe, stalled: the client is gone
            self.m.requests.inc(endpoint=parsed.endpoint, outcome="client_gone")
            raise
        finally:
            # NOTE: on every way out, so a request whose client vanished is aborted on its engines now
            # (a dangling generator would keep decoding until the answer's end).
            await pieces_it.aclose()  # closes each prompt's pieces, and they their events
        return resp

    async def _write(self, resp: web.StreamResponse, events: list[bytes]) -> None:
        for data in events:
            await write_within(resp, data, self.cfg.client_stall_s)


async def _tagged(it: AsyncGenerator[T, None]) -> AsyncGenerator[tuple[int, T], None]:
    """One prompt's pieces as :func:`merged` tags them (no tasks: the common case stays direct)."""
    try:
        async for item in it:
            yield 0, item
    finally:
        await it.aclose()

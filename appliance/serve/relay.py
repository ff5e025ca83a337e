"""The event relay: a worker's NDJSON events in, what the client's answer is made of out.

Written once, for every path a request's tokens take: a unified (or self-prefilling) engine, a decode
engine after a handoff, and the engine a decoding request moved to. It yields `Tokens` events, then
one last item: an `Outcome` (the request is done) or a `Moved` event (it went on to another engine;
the caller follows it). An `Error` event is an `ApiError`; a silent or broken stream `WorkerFailed`.
The relay owns nothing: the caller opens and closes the worker's stream (closing it is the abort).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from appliance.serve import openai_api as oai
from appliance.serve.protocol import Done, Error, Event, First, Moved, Tokens
from appliance.serve.worker_client import WorkerFailed


@dataclass
class Outcome:
    """How a request ended, with its usage."""

    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


Relayed = Tokens | Moved | Outcome  # what the relay (and a placement's generate) yields

Usage = Callable[[Done | Moved], tuple[int, int]]  # a done or moved event -> (prompt tokens, cached tokens)


def worker_usage(ev: Done | Moved) -> tuple[int, int]:
    """The usage the worker itself reports (it saw the whole prompt)."""
    return ev.prompt_tokens, ev.cached_tokens


async def next_event(events: AsyncIterator[Event], who: str, deadline_s: float | None) -> Event:
    """The stream's next event within ``deadline_s`` (None: no deadline), else `WorkerFailed`."""
    if deadline_s is None:
        return await anext(events)
    try:
        async with asyncio.timeout(deadline_s):
            return await anext(events)
    except TimeoutError:
        raise WorkerFailed(f"{who} sent nothing for {deadline_s:.0f} s") from None


async def relay(events: AsyncIterator[Event], who: str, *, idle_s: float, usage: Usage = worker_usage,
                first_wait_s: float | None = None, head: Event | None = None,
                on_first: Callable[[First], bool] | None = None) -> AsyncIterator[Relayed]:
    """Relay ``events`` of worker ``who`` (``head``: one already read from them, handled first).

    ``first_wait_s`` bounds the wait until the first token (None: none, the request may queue behind
    others' prefills), ``idle_s`` every wait after it. A `First` event (decode's first token, which
    the client may already have from prefill) is relayed as `Tokens` when ``on_first(ev)`` says so,
    else dropped. ``usage`` gives the prompt and cached tokens of the `Outcome` and the `Moved` event.
    """
    deadline = first_wait_s
    ev = head if head is not None else await next_event(events, who, deadline)
    while True:
        match ev:
            case Tokens():
                deadline = idle_s
                yield ev
            case First() if on_first is not None and on_first(ev):
                deadline = idle_s
                yield Tokens(token_ids=ev.token_ids, logprobs=ev.logprobs)
            case Done():
                prompt, cached = usage(ev)
                yield Outcome(ev.finish_reason, prompt, cached)
                return
            case Moved():  # went on to another engine (adaptive mode): the caller follows it
                prompt, cached = usage(ev)
                yield Moved(prompt_tokens=prompt, cached_tokens=cached)
                return
            case Error():
                raise oai.ApiError(ev.status or 502, ev.message, kind="server_error")
        ev = await next_event(events, who, deadline)

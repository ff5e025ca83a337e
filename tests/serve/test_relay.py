"""The event relay on scripted worker streams: what each path (unified, after a handoff, after a move)
passes to the client, and how a stream that errs, stalls or moves on ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from appliance.serve import openai_api as oai
from appliance.serve.protocol import Done, Error, Event, First, Moved, Tokens
from appliance.serve.relay import Outcome, Relayed, relay
from appliance.serve.worker_client import WorkerFailed


async def stream(*events: Event, stall_s: float = 0.0) -> AsyncIterator[Event]:
    for ev in events:
        yield ev
    await asyncio.sleep(stall_s)  # a worker that goes silent (0: the stream just ends)
    raise WorkerFailed("w closed its stream before finishing")


def run(gen: AsyncIterator[Relayed]) -> list[Relayed]:
    async def collect() -> list[Relayed]:
        return [ev async for ev in gen]

    return asyncio.run(collect())


TOK = Tokens(token_ids=[5, 6], logprobs=[])
FIRST = First(token_ids=[4], logprobs=[])
DONE = Done(finish_reason="length", prompt_tokens=9, cached_tokens=3)


def test_tokens_then_the_outcome_with_the_workers_usage() -> None:
    out = run(relay(stream(TOK, TOK, DONE), "w", idle_s=1.0))
    assert out == [TOK, TOK, Outcome("length", 9, 3)]


def test_a_first_token_is_dropped_unless_the_caller_relays_it() -> None:
    assert run(relay(stream(FIRST, TOK, DONE), "w", idle_s=1.0))[0] == TOK
    seen: list[First] = []
    out = run(relay(stream(TOK, DONE), "w", idle_s=1.0, head=FIRST, on_first=lambda ev: seen.append(ev) or True,
                    usage=lambda ev: (100, 0)))
    assert seen == [FIRST] and out[0] == Tokens(token_ids=[4], logprobs=[])
    assert out[-1] == Outcome("length", 100, 0)


def test_a_moved_stream_ends_with_a_moved_event_carrying_the_usage() -> None:
    moved = Moved(prompt_tokens=9, cached_tokens=3)
    out = run(relay(stream(TOK, moved), "w", idle_s=1.0, usage=lambda ev: (ev.prompt_tokens, 7)))
    assert out == [TOK, Moved(prompt_tokens=9, cached_tokens=7)]


def test_an_error_event_is_an_api_error_with_its_status() -> None:
    with pytest.raises(oai.ApiError) as err:
        run(relay(stream(TOK, Error(message="no pages", status=503)), "w", idle_s=1.0))
    assert err.value.status == 503 and "no pages" in err.value.message


def test_silence_after_the_first_token_fails_within_idle_s_but_not_before_it() -> None:
    with pytest.raises(WorkerFailed, match="w sent nothing for 0 s"):
        run(relay(stream(TOK, stall_s=5.0), "w", idle_s=0.2))
    # before the first token there is no deadline by default: the stream's own end decides
    with pytest.raises(WorkerFailed, match="closed its stream"):
        run(relay(stream(stall_s=0.3), "w", idle_s=0.1))
    with pytest.raises(WorkerFailed, match="sent nothing"):
        run(relay(stream(stall_s=5.0), "w", idle_s=5.0, first_wait_s=0.2))

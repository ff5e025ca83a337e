"""A row that cannot be sampled fails its own request, not the step: NaN or +inf logits (a forward pass
that overflowed) and rows where nothing is allowed get a failure code from both samplers while their
batch neighbours sample what they would alone; in the engine and its serving loop that request ends
with an error (every sample of it, with n > 1), the others go on with unchanged tokens, and no page
leaks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from appliance.config import EngineConfig
from appliance.engine.device_sampler import DeviceSampler
from appliance.engine.engine import Engine
from appliance.engine.request import Request, SamplingParams
from appliance.engine.row_failure import BAD_LOGITS, NO_TOKEN, failed_rows
from appliance.engine.sampler import Sampler
from appliance.engine.token_mask import TokenMask
from appliance.serve.engine_loop import EngineLoop
from appliance.serve.protocol import Done, Error, Event
from tests.engine.faults import assert_idle as idle
from tests.engine.faults import poison

INF = float("inf")
PROMPT = [10, 20, 30, 40, 50, 60, 70]
OTHER = [3, 1, 4, 1, 5, 9, 2, 6]


def test_failure_codes_come_from_the_row_maximum() -> None:
    top = torch.tensor([1.5, float("nan"), INF, -INF, -1e30])
    assert failed_rows(top).tolist() == [0, BAD_LOGITS, BAD_LOGITS, NO_TOKEN, 0]


def _req(params: SamplingParams) -> Request:
    return Request(prompt_ids=[1, 2, 3], params=params)


SAMPLERS = [pytest.param(lambda: Sampler(seed=1), id="host"), pytest.param(lambda: DeviceSampler(seed=1), id="device")]


@pytest.mark.parametrize("make", SAMPLERS)
def test_a_bad_row_fails_alone_in_both_samplers(make: Callable[[], Sampler | DeviceSampler]) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, generator=g) * 3
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0.8, seed=5, logprobs=2),
              SamplingParams(temperature=1.0, seed=9, top_p=0.9, logprobs=2), SamplingParams(temperature=0)]
    want, want_lp = make().sample(logits, [_req(p) for p in params])
    bad = logits.clone()
    bad[1, 7] = float("nan")  # one NaN poisons a row
    bad[3, 0] = INF
    got, lp = make().sample(bad, [_req(p) for p in params])
    assert got == [want[0], BAD_LOGITS, want[2], BAD_LOGITS]
    assert lp[1] is None and lp[3] is None
    assert lp[0] == want_lp[0] and lp[2] == want_lp[2]


@pytest.mark.parametrize("make", SAMPLERS)
def test_a_row_with_no_allowed_token_fails_alone(make: Callable[[], Sampler | DeviceSampler]) -> None:
    """The constraint's mask allows only token 5 and min_tokens bans it (as it bans EOS early)."""
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    banned = _req(SamplingParams(temperature=0.7, seed=2, min_tokens=4))
    banned.early_stops = (5,)
    words = torch.zeros((1, 2), dtype=torch.int32)
    words[0, 0] = 1 << 5
    greedy = _req(SamplingParams(temperature=0))
    got, _ = make().sample(logits, [greedy, banned], TokenMask((1,), words))
    assert got == [int(logits[0].argmax()), NO_TOKEN]


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(str(tiny_model), EngineConfig(dtype="float32", page_size=4, num_pages=128))


def test_the_engine_fails_the_request_and_the_others_go_on(engine) -> None:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = engine.add_request(OTHER, params)
    engine.run_until_done([alone])
    undo = poison(engine, "victim", after=3)
    try:
        victim = engine.add_request(PROMPT, params, request_id="victim")
        other = engine.add_request(OTHER, params)
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
    finally:
        undo()
    assert other.output_ids == alone.output_ids and other.finish_reason == "length"
    assert victim.finish_reason == "error" and len(victim.output_ids) == 3
    assert "not finite" in (victim.error or "")
    ended = [o for o in outs if o.request_id == "victim" and o.finished]
    assert len(ended) == 1 and ended[0].error == victim.error and ended[0].error_status == 500
    idle(engine)


def test_one_bad_sample_fails_every_sample_of_its_request(engine) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4, ignore_eos=True, n=3)
    undo = poison(engine, "group", after=2, index=2)
    try:
        root = engine.add_request(PROMPT, params, request_id="group")
        other = engine.add_request(OTHER, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        samples: dict[str, Request] = {}
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
            samples.update((k, r) for k, r in engine.requests.items() if r.group == "group")
    finally:
        undo()
    assert set(samples) == {"group~1", "group~2"}
    assert all(r.finish_reason == "error" and r.error for r in (root, *samples.values()))
    assert sum(1 for o in outs if o.error) == 1  # one error for the request, not one per sample
    assert other.finish_reason == "length" and len(other.output_ids) == 8
    idle(engine)


async def _events(q: asyncio.Queue[Event]) -> list[Event]:
    out = []
    while True:
        out.append(await asyncio.wait_for(q.get(), 60))
        if isinstance(out[-1], (Done, Error)):
            return out


def test_the_serving_loop_answers_an_error_for_that_request_only(engine) -> None:
    undo = poison(engine, "bad", after=0)  # the first token: the prefill's own row

    async def scenario() -> tuple[list[Event], list[Event], list[Event]]:
        loop = EngineLoop(engine, asyncio.get_running_loop())
        loop.start()
        try:
            qs = [loop.submit("bad", PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
                  loop.submit("bad-n", OTHER, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)),
                  loop.submit("good", OTHER, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
            return tuple(await asyncio.gather(*map(_events, qs)))  # type: ignore[return-value]
        finally:
            loop.stop()

    try:
        bad, bad_n, good = asyncio.run(scenario())
    finally:
        undo()
    assert len(bad) == 1 and isinstance(bad[0], Error) and bad[0].status == 500 and "not finite" in bad[0].message
    assert isinstance(good[-1], Done) and sum(len(e.token_ids) for e in good[:-1]) == 6
    assert isinstance(bad_n[-1], Done)  # "bad" is a prefix of its id, not its group
    idle(engine)

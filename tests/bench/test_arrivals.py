"""Arrival schedules and the driver that releases requests on them."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from bench.arrivals import Schedule
from bench.client import RequestOutcome
from bench.run import drive
from bench.workloads import BenchRequest


def test_constant_arrivals_are_evenly_spaced() -> None:
    assert Schedule(rate=4.0, process="constant").offsets(5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_poisson_arrivals_are_seeded_with_exponential_gaps() -> None:
    a = Schedule(rate=2.0, seed=3).offsets(20_001)
    assert a == Schedule(rate=2.0, seed=3).offsets(20_001)
    assert a[:50] != Schedule(rate=2.0, seed=4).offsets(50)
    gaps = np.diff(a)
    assert a[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(0.5, rel=0.03)  # mean gap 1/rate
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.04)  # exponential: CV = 1
    assert np.median(gaps) == pytest.approx(0.5 * math.log(2), rel=0.05)  # exponential median


def test_closed_loop_releases_everything_at_once() -> None:
    schedule = Schedule(max_concurrency=4)
    assert schedule.closed_loop
    assert schedule.offsets(3) == [0.0, 0.0, 0.0]
    assert schedule.describe()["request_rate"] == "inf"
    assert Schedule(rate=2.0).describe()["request_rate"] == 2.0
    assert Schedule(rate=2.0).offsets(0) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "--rate R"),
        ({"rate": 0.0}, "positive"),
        ({"rate": -1.0}, "positive"),
        ({"max_concurrency": 0}, "at least 1"),
        ({"rate": 1.0, "process": "bursty"}, "poisson"),
    ],
)
def test_bad_schedules_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def _request(i: int) -> BenchRequest:
    return BenchRequest(prompt=f"p{i}", prompt_len=1, output_len=1, kind="test")


def _fake_send(log: list[tuple[str, float]], in_flight: list[int], hold_s: float):
    async def send(request: BenchRequest) -> RequestOutcome:
        start = time.perf_counter()
        log.append((request.prompt, start))
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        await asyncio.sleep(hold_s)
        in_flight[0] -= 1
        end = time.perf_counter()
        return RequestOutcome(1, 1, start, end, (end,), 1, success=True)

    return send


def test_closed_loop_keeps_exactly_c_in_flight() -> None:
    log: list[tuple[str, float]] = []
    in_flight = [0, 0]
    done: list[RequestOutcome] = []
    result = asyncio.run(
        drive(
            [_request(i) for i in range(9)], Schedule(max_concurrency=3), _fake_send(log, in_flight, 0.02), done.append
        )
    )
    assert in_flight[1] == 3
    assert len(result.outcomes) == 9 and len(done) == 9
    assert [p for p, _ in log] == [f"p{i}" for i in range(9)]  # released in order
    assert result.duration_s >= 3 * 0.02  # three waves of three


def test_open_loop_never_sends_early() -> None:
    log: list[tuple[str, float]] = []
    schedule = Schedule(rate=50.0, process="constant")
    t0 = time.perf_counter()
    result = asyncio.run(drive([_request(i) for i in range(5)], schedule, _fake_send(log, [0, 0], 0.0)))
    offsets = schedule.offsets(5)
    sent = [t - t0 for _, t in log]
    assert all(s >= o - 1e-3 for s, o in zip(sent, offsets)), (sent, offsets)
    assert sent[-1] >= 0.08 and result.duration_s >= 0.08
    assert [o.send_time for o in result.outcomes] == [t for _, t in log]  # outcomes stay in request order

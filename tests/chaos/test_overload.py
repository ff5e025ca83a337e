"""Overload: past --max-inflight the router answers 429 with Retry-After, the workers never see more
than that many requests, a flood of large bodies does not grow the router's memory, and every slot
comes back when clients leave."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.chaos.chaos_util import (
    CHAT,
    MODEL,
    QUESTION,
    SSE,
    Appliance,
    error_of,
    loads,
    rss_mb,
    wait_pools_idle,
)
from tests.chaos.conftest import record
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MAX_INFLIGHT = 4  # the `guarded` appliance's --max-inflight
SHORT = {"model": MODEL, "messages": QUESTION, "max_tokens": 2}


class PeakRSS:
    """The highest resident size of ``pid`` while the block runs, sampled every 5 ms, minus the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def grew_mb(self) -> float:
        return self.peak - self.start


def padded(body: dict, size: int) -> bytes:
    """A valid JSON body of ``size`` bytes (whitespace padding: cheap to parse, costly to buffer)."""
    raw = json.dumps(body).encode()
    return raw[:-1] + b" " * max(0, size - len(raw)) + b"}"


def test_past_max_inflight_the_router_answers_429(guarded: Appliance) -> None:
    streams = [SSE(guarded, CHAT, {"model": MODEL, "messages": QUESTION, "max_tokens": 1000, "ignore_eos": True})
               for _ in range(MAX_INFLIGHT)]
    try:
        assert all(s.status == 200 for s in streams)
        big = padded(SHORT, 3 * 1024 * 1024)
        with ThreadPoolExecutor(16) as pool, PeakRSS(guarded.pid) as rss:
            small = list(pool.map(lambda _: guarded.post(CHAT, SHORT, timeout=10), range(48)))
            large = list(pool.map(lambda _: guarded.post(CHAT, None, raw=big, timeout=20), range(48)))
        record("requests refused with 429", len(small) + len(large))
        for status, headers, body in small + large:
            assert status == 429, body[:200]
            assert int(headers["Retry-After"]) >= 1
            assert error_of(body)["type"] == "rate_limit_error"
        assert rss.grew_mb < 48, f"router memory grew {rss.grew_mb:.0f} MB under a flood of refused 3 MB bodies"
        for name, ld in loads(guarded).items():  # bounded queues: nothing past the router's limit got through
            assert ld["running"] + ld["waiting"] <= MAX_INFLIGHT, (name, ld)
    finally:
        for s in streams:
            s.drop()
    wait_until(lambda: all(not ld["running"] for ld in loads(guarded).values()), 5, what="the dropped streams' aborts")
    status, body = guarded.chat()
    assert status == 200, body  # the four slots came back
    wait_pools_idle(guarded)


def test_concurrent_large_bodies_are_buffered_at_most_max_inflight_at_once(guarded: Appliance) -> None:
    big = padded(SHORT, 3 * 1024 * 1024)
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool, PeakRSS(guarded.pid) as rss:
        results = list(pool.map(lambda _: guarded.post(CHAT, None, raw=big, timeout=60), range(96)))
    codes = sorted({status for status, _, _ in results})
    assert set(codes) <= {200, 429}, codes
    assert any(status == 200 for status, _, _ in results)
    print(f"96 x 3 MB bodies in {time.monotonic() - t0:.1f} s: {codes}, router peak +{rss.grew_mb:.0f} MB")
    assert rss.grew_mb < 64, f"router memory grew {rss.grew_mb:.0f} MB for 96 concurrent 3 MB bodies"
    wait_pools_idle(guarded)

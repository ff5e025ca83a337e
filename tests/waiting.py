"""The one poll-until helper of the tests: wait for a condition, or fail naming what was awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "the condition") -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that;
    after ``timeout`` seconds raise `TimeoutError` naming ``what``. It is always called at least once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], T], timeout: float, interval: float = 0.05,
                           what: str = "the condition") -> T:
    """`wait_until` inside an event loop: sleeps with ``asyncio.sleep``, so the loop runs meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)

"""Fixtures for the transport tests: spawned prefill processes that are always reaped."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import nvshmem_kv as nk
from tests.transport.helpers import Spawn
from tests.transport.transport_workers import run_prefill


@pytest.fixture
def spawn_worker() -> Iterator[Callable[[Callable[..., None], dict[str, Any]], tuple[Any, Any]]]:
    """start(target, spec) -> (process, pipe end); every process is told to close, then reaped."""
    ctx = mp.get_context("spawn")
    started: list[tuple[Any, Any]] = []

    def start(target: Callable[..., None], spec: dict[str, Any]) -> tuple[Any, Any]:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        started.append((proc, parent))
        return proc, parent

    yield start
    for _proc, conn in started:
        try:
            conn.send("close")
        except OSError:
            pass
    for proc, _ in started:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


@pytest.fixture
def spawn_prefill(spawn_worker: Callable[[Callable[..., None], dict[str, Any]], tuple[Any, Any]]) -> Spawn:
    return lambda spec: spawn_worker(run_prefill, spec)


@pytest.fixture
def receivers() -> Iterator[list[nk.KVTransport]]:
    """Transports created by a test; closed (and their shm unlinked) afterwards."""
    made: list[nk.KVTransport] = []
    yield made
    for t in made:
        t.close()

"""Prompts that arrive together are spread over the engines even when a busy worker answers late: each
is counted on its engine from the pick, not from the worker's answer (a burst of 48 once went 46 to one
engine). A request that ends before its worker answered gives its count back."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from appliance.serve.dispatch import Dispatcher
from appliance.serve.policies import WorkerHandle
from appliance.serve.router_config import RouterConfig
from appliance.serve.router_metrics import RouterMetrics
from appliance.serve.worker_client import WorkerFailed

N = 8


class SlowClient:
    """A worker client whose workers answer only when ``gate`` opens (their engines are mid-step)."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.gate = asyncio.Event()
        self.calls: list[str] = []
        self.fail = fail

    async def _answer(self, w: WorkerHandle) -> None:
        self.calls.append(w.name)
        await self.gate.wait()
        if w.name in self.fail:
            raise WorkerFailed(f"{w.name} refused")
        raise asyncio.CancelledError  # the test only looks at the picks

    async def generate(self, w: WorkerHandle, req: object) -> None:
        await self._answer(w)

    async def reserve(self, w: WorkerHandle, req: object) -> None:
        await self._answer(w)


def engines(role: str) -> list[WorkerHandle]:
    return [WorkerHandle(f"{role}-{i}", role, f"http://{role}{i}", healthy=True) for i in range(2)]


async def burst(role: str, policy: str) -> tuple[SlowClient, list[WorkerHandle]]:
    client = SlowClient()
    pool = engines(role)
    cfg = RouterConfig(unified_policy=policy, decode_policy=policy)
    d = Dispatcher(cfg, client, RouterMetrics(), eligible=lambda r: pool)  # type: ignore[arg-type]

    async def one(i: int) -> None:
        ids = [1000 + 97 * i + k for k in range(64)]  # no shared prefix
        if role == "unified":
            async for _ in d.unified(SimpleNamespace(prompt_ids=ids, sampling=None), f"r{i}"):  # type: ignore[arg-type]
                pass
        else:
            await d.reserve_decode(ids, SimpleNamespace(), {})  # type: ignore[arg-type]

    tasks = [asyncio.ensure_future(one(i)) for i in range(N)]
    while len(client.calls) < N:
        await asyncio.sleep(0)
    assert [w.inflight for w in pool] == [N // 2, N // 2]  # counted while the workers have not answered
    client.gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return client, pool


@pytest.mark.parametrize("policy", ["cache_aware", "least_load"])
@pytest.mark.parametrize("role", ["unified", "decode"])
def test_a_burst_is_spread_before_any_worker_answers(role: str, policy: str) -> None:
    client, pool = asyncio.run(burst(role, policy))
    assert sorted(client.calls.count(w.name) for w in pool) == [N // 2, N // 2]
    assert [w.inflight for w in pool] == [0, 0]  # every count given back when the requests ended


def test_a_refused_pick_gives_its_count_back() -> None:
    async def run() -> list[WorkerHandle]:
        pool = engines("unified")
        client = SlowClient(fail={"unified-0"})
        client.gate.set()
        d = Dispatcher(RouterConfig(unified_policy="round_robin"), client, RouterMetrics(),  # type: ignore[arg-type]
                       eligible=lambda r: pool)
        with pytest.raises(asyncio.CancelledError):
            async for _ in d.unified(SimpleNamespace(prompt_ids=[1, 2, 3], sampling=None), "r0"):  # type: ignore[arg-type]
                pass
        assert client.calls == ["unified-1"] or client.calls == ["unified-0", "unified-1"]
        return pool

    pool = asyncio.run(run())
    assert [w.inflight for w in pool] == [0, 0]

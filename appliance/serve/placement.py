"""Placement: where each request runs. `Placement` is what the HTTP layer needs of one;
`FixedPlacement` serves ``--mode disagg`` and ``--mode unified`` (the policies pick the engines).
The adaptive one (``--mode auto``) is :class:`appliance.serve.adaptive_placement.AdaptivePlacement`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from appliance.serve import openai_api as oai
from appliance.serve.dispatch import Dispatcher
from appliance.serve.policies import WorkerHandle
from appliance.serve.relay import Relayed
from appliance.serve.router_config import RouterConfig
from appliance.serve.worker_pool import WorkerPool


class Placement(Protocol):
    def roles(self) -> tuple[str, ...]:
        """The roles ``/health`` reports (each needs a healthy engine for the router to be ok)."""
        ...

    def healthy(self, role: str) -> list[WorkerHandle]:
        """The healthy engines that take ``role`` now."""
        ...

    def generate(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Relayed]:
        """The request's events: tokens, then its `Outcome`."""
        ...

    async def health_loop(self) -> None:
        """Keep the pool's health and load fresh (and whatever the placement steers by), until cancelled."""
        ...

    def describe(self, w: WorkerHandle) -> dict[str, Any]:
        """What ``/workers`` adds to the worker's entry."""
        ...

    def summary(self) -> dict[str, Any]:
        """What ``/workers`` adds at the top level."""
        ...


class FixedPlacement:
    """Every request the same way: ``unified`` on one engine, or ``disagg`` (prefill, then decode)."""

    def __init__(self, cfg: RouterConfig, pool: WorkerPool, dispatch: Dispatcher) -> None:
        self.cfg = cfg
        self.pool = pool
        self.dispatch = dispatch

    def roles(self) -> tuple[str, ...]:
        return ("unified",) if self.cfg.mode == "unified" else ("prefill", "decode")

    def healthy(self, role: str) -> list[WorkerHandle]:
        return self.pool.healthy(role)

    def generate(self, parsed: oai.ParsedRequest, rid: str) -> AsyncIterator[Relayed]:
        if self.cfg.mode == "unified":
            return self.dispatch.unified(parsed, rid)
        return self.dispatch.disagg(parsed, rid)

    async def health_loop(self) -> None:
        await self.pool.health_loop()

    def describe(self, w: WorkerHandle) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}

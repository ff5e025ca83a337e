"""A prefill engine's handoff compiles its copy path at start-up; a warm-up that fails costs nothing else."""

from __future__ import annotations

import logging

import pytest
import torch

import nvshmem_kv as nk
from appliance.engine.handoff import PrefillHandoff


def _handoff(warm) -> PrefillHandoff:  # type: ignore[no-untyped-def]
    t = nk.create("fake", run_id="warm")
    t.warm = warm  # type: ignore[method-assign]
    return PrefillHandoff(t, torch.zeros(2, 2, 8, 4, 2, 8), total_kv_heads=2, page_size=4)


def test_the_warm_up_time_is_kept_for_the_start_up_report() -> None:
    seen = []
    h = _handoff(lambda kv, local: seen.append((tuple(kv.shape), local.num_pages)) or 0.25)
    assert h.sender.warm_s == 0.25
    assert seen == [((2, 2, 8, 4, 2, 8), 8)]  # the engine's own pool, described as the peers will see it
    h.sender.transport.close()


def test_a_failed_warm_up_is_logged_and_serving_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def broken(kv, local):  # type: ignore[no-untyped-def]
        raise RuntimeError("no compiler here")

    with caplog.at_level(logging.WARNING, logger="pdbox.handoff"):
        h = _handoff(broken)
    assert h.sender.warm_s == 0.0
    assert "KV copy warm-up failed" in caplog.text and "no compiler here" in caplog.text
    h.sender.transport.close()


def test_cpu_transports_have_nothing_to_warm() -> None:
    for name in ("fake", "shm"):
        t = nk.create(name)
        try:
            kv = torch.zeros(2, 1, 4, 2, 1, 4)
            assert t.warm(kv, nk.PoolDescriptor.from_tensor(kv, 1)) == 0.0
        finally:
            t.close()

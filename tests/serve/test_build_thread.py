"""A CPU worker builds its engine on a thread that has ended before serving starts (so the main thread
never owns an OpenMP team that would throttle the engine thread's); GPU and TP workers on the main thread."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from appliance.serve.build_thread import build_engine_for_serving


class FakeWorker:
    def __init__(self, device: str, fail: bool = False, tp_size: int = 1) -> None:
        self.cfg = SimpleNamespace(engine=SimpleNamespace(device=device, tp_size=tp_size))
        self.fail = fail
        self.built_on: threading.Thread | None = None

    def build_engine(self) -> None:
        self.built_on = threading.current_thread()
        if self.fail:
            raise ValueError("checkpoint is missing tensor 'x'")


def test_cpu_builds_on_a_thread_that_has_ended() -> None:
    w = FakeWorker("cpu")
    build_engine_for_serving(w)
    assert w.built_on is not None and w.built_on is not threading.main_thread()
    assert w.built_on.name == "pdbox-build" and not w.built_on.is_alive()


@pytest.mark.parametrize("device,tp", [("cuda:0", 1), ("cpu", 2)])
def test_gpu_and_tp_build_on_the_main_thread(device: str, tp: int) -> None:
    """A TP engine's follower ranks are children that die with the thread that spawned them."""
    w = FakeWorker(device, tp_size=tp)
    build_engine_for_serving(w)
    assert w.built_on is threading.main_thread()


def test_a_failed_build_raises_on_the_caller() -> None:
    with pytest.raises(ValueError, match="missing tensor"):
        build_engine_for_serving(FakeWorker("cpu", fail=True))

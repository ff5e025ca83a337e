"""Building a CPU worker's engine off the main thread (see :func:`build_engine_for_serving`)."""

from __future__ import annotations

import threading
from typing import Any, Protocol


class Buildable(Protocol):
    """What this needs of a worker: its config (``cfg.engine``) and ``build_engine``."""

    cfg: Any

    def build_engine(self) -> None: ...


def build_engine_for_serving(worker: Buildable) -> None:
    """``worker.build_engine()``; on CPU, on a thread of its own that ends before serving starts.

    The engine steps on its own thread (``EngineLoop``). GNU OpenMP throttles every thread team's
    spin-wait once it manages more threads than there are cores, so had the main thread run a
    parallel region (loading and packing weights does), its idle team would count, and every op of a
    multi-threaded CPU engine would wait on a sleeping helper: 31-37 ms a batch-1 decode step instead
    of 22.6 on 2 cores here. A thread's team goes away when the thread ends.

    A GPU worker builds on the main thread as before (its CUDA and NVSHMEM set-up stays where it was
    proven), and so does a TP engine: its other ranks are child processes that die with the thread
    that started them (``PR_SET_PDEATHSIG`` follows the parent thread, not the process).
    """
    engine = worker.cfg.engine
    if not engine.device.startswith("cpu") or engine.tp_size > 1:
        worker.build_engine()
        return
    failed: list[BaseException] = []

    def build() -> None:
        try:
            worker.build_engine()
        except BaseException as exc:  # raised again on the main thread
            failed.append(exc)

    thread = threading.Thread(target=build, name="pdbox-build", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]

"""The compute/copy stream-ordering contract, on CPU: fake streams log their ops, and a small
adversarial executor runs each stream in order but the compute stream as early as its waits allow
(what a GPU may do). A page freed after the first token must be overwritten by the next step's
store_kv only after the copy that reads it; without the fence the executor shows the race.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import msgspec
import pytest
import torch

import nvshmem_kv as nk
from appliance.engine.handoff import PrefillHandoff, Transfer
from appliance.engine.request import Request, SamplingParams
from appliance.engine.scheduler import ScheduledBatch
from nvshmem_kv.backends.fake import FakeTransport
from nvshmem_kv.copy_order import CopyOrder


class Event:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


class Stream:
    """Enqueues ops (labels), event records and event waits, like a CUDA stream; runs nothing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ops: list[tuple[str, object]] = []

    def op(self, label: str) -> None:
        self.ops.append(("op", label))

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event()
        self.ops.append(("record", event))
        return event

    def wait_event(self, event: Event) -> None:
        self.ops.append(("wait", event))

    def wait_stream(self, other: Stream) -> None:
        self.wait_event(other.record_event())


def execute(*streams: Stream) -> list[str]:
    """Run the streams' ops; the first stream runs whenever it can (eager compute). Returns op order."""
    pos = {s.name: 0 for s in streams}
    done: list[str] = []
    while any(pos[s.name] < len(s.ops) for s in streams):
        for s in streams:
            if pos[s.name] >= len(s.ops):
                continue
            kind, arg = s.ops[pos[s.name]]
            if kind == "wait" and not arg.done:  # type: ignore[union-attr]
                continue
            if kind == "record":
                arg.done = True  # type: ignore[union-attr]
            elif kind == "op":
                done.append(f"{s.name}:{arg}")
            pos[s.name] += 1
            break
        else:
            raise AssertionError("deadlock: every stream waits")
    return done


def store_then_copy() -> tuple[Stream, Stream, CopyOrder]:
    """Compute stores layer 0; the copy stream then reads page 3 of it (ordered after the store)."""
    compute, copy = Stream("compute"), Stream("copy")
    order = CopyOrder(copy)
    compute.op("store L0")
    order.before_copy(compute)
    copy.op("read page 3")
    order.after_copy()
    return compute, copy, order


def test_fence_makes_compute_wait_for_the_copies() -> None:
    compute, copy, order = store_then_copy()
    assert order.fence(compute) is True
    compute.op("store page 3 (next step)")
    assert execute(compute, copy) == ["compute:store L0", "copy:read page 3", "compute:store page 3 (next step)"]
    assert order.fence(compute) is False       # nothing copied since: no event, no wait
    assert compute.ops[-1] == ("op", "store page 3 (next step)")


def test_without_the_fence_the_next_store_overtakes_the_copy() -> None:
    compute, copy, _ = store_then_copy()
    compute.op("store page 3 (next step)")
    assert execute(compute, copy).index("compute:store page 3 (next step)") < 2   # the race


def test_drain_is_enqueued_before_the_fence_event() -> None:
    compute, copy = Stream("compute"), Stream("copy")
    order = CopyOrder(copy, drain=lambda: copy.op("quiet"))
    order.after_copy()
    order.fence(compute)
    assert [k for k, _ in copy.ops] == ["op", "record"] and copy.ops[0] == ("op", "quiet")


def test_wait_holds_the_host_until_the_copies_ran() -> None:
    """Before freed pages go to a writer no stream orders (another engine's one-sided copies), the host
    sees every copy so far finish; with none since the last wait there is nothing to wait for."""
    compute, copy, order = store_then_copy()
    with pytest.raises(TimeoutError, match="did not finish"):
        order.wait(0.02)  # nothing runs the streams
    runner = threading.Timer(0.05, lambda: execute(compute, copy))
    runner.start()
    try:
        assert order.wait(10.0) is True
    finally:
        runner.join()
    assert copy.ops[-1][0] == "record" and copy.ops[-1][1].done  # type: ignore[union-attr]
    assert order.wait(0.0) is False


class StreamedFake(FakeTransport):
    """The fake backend with a copy stream: each write enqueues one read per page on it."""

    def __init__(self, compute: Stream, copy: Stream, **opts) -> None:
        super().__init__(**opts)
        self.compute, self.copy = compute, copy
        self._order = CopyOrder(copy)

    def _compute_stream(self) -> Stream:
        return self.compute

    def _write_runs(self, peer, room, layer, src_kv, runs) -> int:
        for r in runs:
            for i in range(r.length):
                self.copy.op(f"read L{layer} page {r.src + i}")
        return 0


def _pool(layers: int = 2, pages: int = 8) -> torch.Tensor:
    return torch.zeros(2, layers, pages, 4, 2, 8)


@contextlib.contextmanager
def _streamed() -> Iterator[tuple[Stream, Stream, nk.KVTransport, StreamedFake, str, PrefillHandoff]]:
    """A fake decode pool, a sender whose copies go on a logged stream, and a prefill handoff over them."""
    compute, copy = Stream("compute"), Stream("copy")
    recv, send = nk.create("fake", run_id="dst"), StreamedFake(compute, copy, run_id="src")
    try:
        kv = _pool()
        desc = nk.PoolDescriptor.from_tensor(kv, 2)
        handle = recv.register_pool(recv.allocate_pool(desc), desc).to_json().decode()
        yield compute, copy, recv, send, handle, PrefillHandoff(send, kv, total_kv_heads=2, page_size=4)
    finally:
        send.close()
        recv.close()


def test_prefill_handoff_fences_before_the_next_step_writes_freed_pages() -> None:
    """Step 1 prefills a prompt in pages 3-4 and pushes them; they are freed with the first token;
    step 2 stores another request's KV into page 3. Its store must follow every copy of page 3."""
    with _streamed() as (compute, copy, recv, _, handle, handoff):
        recv.expect("room", 1, time.monotonic() + 30)
        req = Request(prompt_ids=list(range(8)), params=SamplingParams(max_tokens=1))
        req.pages, req.transfer = [3, 4], Transfer("room", [handle], [0, 1])
        hook, _ = handoff.before_forward(ScheduledBatch([req], [0], [8], [True]))
        assert hook is not None
        for layer in range(2):
            compute.op(f"store L{layer} pages 3-4")
            hook(layer)
        handoff.after_first_token(req, 7, None)
        assert recv.wait("room", 10).payloads == (msgspec.json.encode({"token": 7, "logprob": None}),)
        handoff.before_forward(ScheduledBatch([], [], [], []))   # step 2: pages 3-4 were freed
        compute.op("store L0 page 3 (step 2)")
        ran = execute(compute, copy)
        reads = [i for i, op in enumerate(ran) if op.startswith("copy:read") and "page 3" in op]
        assert len(reads) == 2 and max(reads) < ran.index("compute:store L0 page 3 (step 2)")
        assert ran.index("compute:store L1 pages 3-4") < ran.index("copy:read L1 page 3")  # copies after stores


def test_a_reservation_waits_for_the_copies_of_a_sending_engine() -> None:
    """An engine that both sends and receives (auto) reserves pages for a remote writer only after its own
    copies ran: a move queues a whole request's KV, whose pages are freed at once."""
    with _streamed() as (compute, copy, recv, send, handle, handoff):
        req = Request(prompt_ids=list(range(8)), params=SamplingParams(max_tokens=1))
        req.pages, req.computed_len = [3, 4], 8
        recv.expect("moved", 1, time.monotonic() + 30)
        handoff.push_request(req, "moved", [handle], [0, 1], b"{}")
        with pytest.raises(nk.TransportError, match="did not finish"):
            send.wait_copies(0.02)
        runner = threading.Timer(0.05, lambda: execute(compute, copy))
        runner.start()
        try:
            handoff.wait_copies()
        finally:
            runner.join()
        assert all(op[1].done for op in copy.ops if op[0] == "record")  # type: ignore[union-attr]


def test_cpu_backends_need_no_fence() -> None:
    t = nk.create("fake", run_id="x")
    try:
        t.fence_compute()  # no copy stream: a no-op, never an error
        t.wait_copies(0.0)
    finally:
        t.close()

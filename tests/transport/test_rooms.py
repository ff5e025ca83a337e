"""The receiver's room table: exactly-once completion, deadlines, dead writers, bounded memory."""

from __future__ import annotations

import threading
import time

import pytest

from nvshmem_kv import RoomState, TransportError
from nvshmem_kv.rooms import RoomTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_done_after_all_signals_payloads_by_rank() -> None:
    t = RoomTable()
    t.expect("r", 2, 5.0)
    assert t.on_signal("r", conn_id=7, src_rank=1, payload=b"one")
    assert t.poll("r").pending
    assert t.on_signal("r", conn_id=3, src_rank=0, payload=b"zero")
    st = t.poll("r")
    assert st.state is RoomState.DONE and st.payloads == (b"zero", b"one")
    assert t.drain_completed() == [("r", st)]
    assert t.drain_completed() == []


def test_completes_exactly_once() -> None:
    t = RoomTable()
    t.expect("r", 1, 5.0)
    assert t.on_signal("r", 1, 0, b"a")
    assert not t.on_signal("r", 1, 0, b"again")      # duplicate from the same connection
    assert not t.on_signal("r", 2, 0, b"late")       # after completion
    t.on_conn_lost(1, "gone")                        # cannot turn DONE into FAILED
    assert t.poll("r").done and t.signals_dropped == 2
    assert [name for name, _ in t.drain_completed()] == ["r"]
    assert t.rooms_done == 1 and t.rooms_failed == 0


def test_unknown_and_released_rooms_are_dropped_without_growth() -> None:
    t = RoomTable()
    for i in range(1000):
        assert not t.on_signal(f"ghost-{i}", 1, 0, b"x")
        assert "unknown" in t.on_open(f"ghost-{i}", 1)
    assert t.signals_dropped == 1000 and not t._rooms
    t.expect("r", 1, 5.0)
    t.release("r")
    assert not t.on_signal("r", 1, 0, b"x")
    assert "given up" in t.on_open("r", 1) and t.quiet("r")
    with pytest.raises(TransportError, match="never expected"):
        t.poll("r")


def test_deadline_fails_room_and_wait_never_overshoots() -> None:
    clock = Clock()
    t = RoomTable(clock=clock)
    t.expect("r", 2, 1.5)
    t.on_signal("r", 1, 0, b"a")
    clock.now += 1.0
    assert t.poll("r").pending
    clock.now += 0.6
    st = t.poll("r")
    assert st.failed and "1/2" in st.reason
    assert not t.on_signal("r", 2, 1, b"b")
    real = RoomTable()
    real.expect("slow", 1, 0.3)
    start = time.monotonic()
    assert real.wait("slow", timeout_s=10.0).failed
    assert time.monotonic() - start < 1.0
    real.expect("short", 1, 10.0)
    start = time.monotonic()
    assert real.wait("short", timeout_s=0.2).pending
    assert time.monotonic() - start < 1.0


def test_lost_connection_fails_only_rooms_it_opened_and_did_not_signal() -> None:
    t = RoomTable()
    for r in ("a", "b", "c"):
        t.expect(r, 2, 30.0)
    t.on_open("a", 1)
    t.on_open("b", 1)
    t.on_signal("b", 1, 0, b"")      # conn 1 finished its part of b
    t.on_open("c", 2)
    t.on_conn_lost(1, "sender died")
    assert t.poll("a").failed and t.poll("a").reason == "sender died"
    assert t.poll("b").pending and t.poll("c").pending


def test_wait_wakes_on_signal_from_another_thread() -> None:
    t = RoomTable()
    t.expect("r", 1, 30.0)
    threading.Timer(0.1, t.on_signal, args=("r", 1, 0, b"x")).start()
    assert t.wait("r", 5.0).done


def test_limits_and_argument_checks() -> None:
    t = RoomTable(max_rooms=2)
    t.expect("a", 1, 1.0)
    with pytest.raises(TransportError, match="already expected"):
        t.expect("a", 1, 1.0)
    t.expect("b", 1, 1.0)
    with pytest.raises(TransportError, match="too many rooms"):
        t.expect("c", 1, 1.0)
    with pytest.raises(ValueError):
        t.expect("d", 0, 1.0)
    t.release("a")
    t.expect("c", 1, 1.0)


def test_deadline_heap_is_compacted() -> None:
    t = RoomTable()
    for i in range(5000):
        t.expect(f"r{i}", 1, 600.0)
        t.release(f"r{i}")
    assert len(t._deadlines) <= 1025


def test_on_finish_is_called_once_per_room_that_leaves_pending() -> None:
    clock = Clock()
    t = RoomTable(clock=clock)
    calls: list[int] = []
    t.on_finish = lambda: calls.append(len(t._completed))  # runs after the room is recorded as completed
    t.expect("ok", 1, 5.0)
    t.expect("late", 1, 1.0)
    t.expect("cut", 1, 5.0)
    assert t.on_open("cut", 9) == ""
    assert t.on_signal("ok", 1, 0, b"x") and calls == [1]
    assert not t.on_signal("ok", 1, 0, b"again") and calls == [1]     # a duplicate finishes nothing
    t.on_conn_lost(9, "gone")
    assert calls == [1, 2]
    clock.now += 2.0
    assert t.poll("late").failed and calls == [1, 2, 3]              # a deadline, noticed on a poll
    assert sorted(name for name, _ in t.drain_completed()) == ["cut", "late", "ok"]


def test_extend_moves_a_pending_deadline_later_never_earlier() -> None:
    clock = Clock()
    t = RoomTable(clock=clock)
    t.expect("r", 1, 2.0)
    clock.now += 1.5
    assert t.extend("r", 2.0)                        # now due at +3.5
    assert t.extend("r", 0.5)                        # still pending; an earlier deadline is not taken
    clock.now += 1.5                                 # past the first deadline, not the renewed one
    assert t.poll("r").pending
    assert t.drain_completed() == []                 # the stale heap entry failed nothing
    clock.now += 0.6
    st = t.poll("r")
    assert st.state is RoomState.FAILED and "deadline" in st.reason
    assert not t.extend("r", 5.0)                    # a finished room stays finished
    assert t.poll("r").state is RoomState.FAILED
    assert not t.extend("never-expected", 5.0)
    with pytest.raises(ValueError, match="deadline_s"):
        t.extend("r", 0)


def test_extend_of_a_done_room_changes_nothing() -> None:
    t = RoomTable()
    t.expect("r", 1, 5.0)
    assert t.on_signal("r", 1, 0, b"a")
    assert not t.extend("r", 5.0)
    assert t.poll("r").state is RoomState.DONE


def test_a_released_room_drains_until_each_writer_is_done_with_it() -> None:
    """One-sided writes may still land after a room failed: its pages are reusable (quiet) only once every
    writer that opened it signalled it, gave it up (Close) or lost its connection."""
    t = RoomTable()
    t.expect("r", 2, 5.0)
    assert t.on_open("r", 1) == t.on_open("r", 2) == t.on_open("r", 3) == ""
    assert t.on_signal("r", 1, 0, b"")
    t.on_close("r", 2)  # a writer gives up: the room fails now, not at its deadline
    st = t.poll("r")
    assert st.failed and st.reason == "the sender gave the room up"
    t.release("r")
    assert not t.quiet("r") and t.draining_count() == 1  # writer 3 may still be writing
    t.on_conn_lost(3, "gone")
    assert t.quiet("r") and t.draining_count() == 0


def test_a_close_or_late_signal_after_release_ends_the_drain() -> None:
    t = RoomTable()
    for room in ("a", "b", "c"):
        t.expect(room, 1, 5.0)
        assert t.on_open(room, 4) == ""
        assert t.release(room) == {4}  # the writer still busy with it: the transport cancels it there
        assert not t.quiet(room)
    t.on_close("a", 4)
    assert not t.on_signal("b", 4, 0, b"late")  # dropped as before, but the writer is done
    assert t.quiet("a") and t.quiet("b") and not t.quiet("c")
    t.on_close("c", 9)  # another connection's close says nothing of writer 4
    assert not t.quiet("c")
    t.expect("late", 1, 5.0)
    assert t.on_open("late", 5) == ""
    t.on_close("late", 6)  # not a writer of it: nothing changes
    t.fail_all("deadline")
    assert not t.on_signal("late", 5, 0, b"")  # after the room failed: dropped, yet the writer is done
    t.release("late")
    assert t.quiet("late")
    t.expect("failed-first", 1, 5.0)
    t.fail_all("deadline")
    assert t.on_open("failed-first", 8) == "the room already failed: deadline"  # refused: it writes nothing
    assert t.release("failed-first") == set() and t.quiet("failed-first")
    t.expect("none", 1, 5.0)
    t.release("none")
    assert t.quiet("none")  # nobody began writing it
    t.on_close("ghost", 4)  # unknown rooms are not stored
    assert t.draining_count() == 1


def test_an_open_is_accepted_only_while_the_room_is_pending() -> None:
    """A writer that asks late (a prefill step that began before it heard of the failure) is refused and
    recorded nowhere: it writes nothing, so the pages wait for nobody. A room past its deadline is
    refused on the Open itself, before any poll noticed the deadline."""
    clock = Clock()
    t = RoomTable(clock=clock)
    t.expect("r", 2, 5.0)
    assert t.on_open("r", 1) == ""
    clock.now += 6.0
    assert t.on_open("r", 2).startswith("the room already failed: deadline passed")
    assert t.release("r") == {1} and t.draining_count() == 1  # only the writer it accepted
    assert "given up" in t.on_open("r", 3)
    t.on_close("r", 1)
    assert t.quiet("r")
    t.expect("d", 1, 5.0)
    assert t.on_signal("d", 4, 0, b"") and t.on_open("d", 5) == "the room already completed"


def test_draining_rooms_are_bounded() -> None:
    t = RoomTable(max_rooms=4)
    for i in range(10):
        t.expect(f"r{i}", 1, 5.0)
        t.on_open(f"r{i}", 1)
        t.release(f"r{i}")
    assert t.draining_count() == 4 and t.quiet("r0") and not t.quiet("r9")

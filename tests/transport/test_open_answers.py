"""A sender writes a room only once the receiver accepted its Open, and stops when the receiver cancels
it: one-sided copies (shm here; cuda_ipc and nvshmem alike) never land in pages the receiver gave up.
Real shm pools and sockets."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

import nvshmem_kv as nk
from nvshmem_kv.answers import Answers
from nvshmem_kv.wire import Cancel, Opened, send_frame
from tests.transport.helpers import make_desc
from tests.waiting import wait_until

D = make_desc(8)


def _pair(made: list[nk.KVTransport], **tx_opts: float) -> tuple[nk.KVTransport, torch.Tensor, nk.KVTransport,
                                                                    nk.Peer]:
    rx, tx = nk.create("shm"), nk.create("shm", **tx_opts)
    made += [rx, tx]
    pool = rx.allocate_pool(D)
    return rx, pool, tx, tx.connect(rx.register_pool(pool, D), D)


def _src() -> torch.Tensor:
    return torch.ones(D.shape, dtype=torch.bfloat16)


def test_a_cancelled_room_is_written_no_more_and_its_pages_wait_for_the_close(receivers) -> None:
    rx, pool, tx, peer = _pair(receivers)
    rx.expect("r", 1, 0.3)
    tx.write(peer, "r", 0, _src(), [0], [1])  # accepted: layer 0 lands
    assert pool[:, 0, 1].all()
    wait_until(lambda: rx.drain_completed(), 5.0, 0.02, what="the deadline to fail the room")
    rx.release("r")  # the receiver gives the room up while this sender is busy with it: Cancel
    assert not rx.quiet("r")
    wait_until(lambda: peer.answers.cancelled("r"), 5.0, 0.01, what="the Cancel to reach the sender")
    with pytest.raises(nk.TransportError, match="gave room 'r' up"):
        tx.write(peer, "r", 1, _src(), [0], [1])
    assert not pool[:, 1].any()  # layer 1 never went out
    tx.abandon(peer, "r")  # the caller gives it up: Close, behind what was written
    wait_until(lambda: rx.quiet("r"), 5.0, 0.01, what="the Close to end the drain")


def test_a_room_opened_ahead_holds_its_pages_until_the_sender_lets_go(receivers) -> None:
    """`open` before the first write (the handoff sends it before the step computes): the receiver counts
    the sender as a writer from then on, so giving the room up waits for it even though nothing was
    written yet."""
    rx, _, tx, peer = _pair(receivers)
    rx.expect("r", 1, 30.0)
    tx.open(peer, "r")
    rx.expect("probe", 1, 30.0)
    tx.write(peer, "probe", 0, _src(), [0], [2])  # answered in order: the Open of "r" was answered first
    rx.release("r")
    assert not rx.quiet("r")
    tx.abandon(peer, "r")
    wait_until(lambda: rx.quiet("r"), 5.0, 0.01, what="the Close to end the drain")


def test_a_receiver_that_never_answers_fails_the_write_at_its_deadline(receivers) -> None:
    rx, pool, tx, peer = _pair(receivers, answer_timeout_s=0.2)
    rx._server.send = lambda conn_id, msg: True  # noqa: SLF001 - a receiver whose answers never come
    rx.expect("r", 1, 30.0)
    with pytest.raises(nk.TransportError, match="did not answer room 'r'"):
        tx.write(peer, "r", 0, _src(), [0], [1])
    assert not pool.any()


def test_answers_record_opens_and_cancels_and_a_closed_socket_ends_every_wait() -> None:
    a, b = socket.socketpair()
    lost: list[str] = []
    answers = Answers(a, "test", lost.append, memory=3)
    try:
        answers.asked("yes")
        answers.asked("no")
        send_frame(b, Opened("yes", ok=True))
        send_frame(b, Opened("no", ok=False, error="unknown"))
        answers.wait_accepted("yes", 5.0)
        with pytest.raises(nk.TransportError, match="refused room 'no': unknown"):
            answers.wait_accepted("no", 5.0)
        send_frame(b, Cancel("yes"))
        wait_until(lambda: answers.cancelled("yes"), 5.0, 0.01, what="the Cancel")
        send_frame(b, Opened("yes", ok=True))  # a Cancel is final
        with pytest.raises(nk.TransportError, match="gave room 'yes' up"):
            answers.wait_accepted("yes", 5.0)
        answers.forget("yes")
        send_frame(b, Cancel("yes"))  # late, after this sender closed the room: ignored, not kept
        answers.asked("z")
        send_frame(b, Opened("z", ok=True))
        answers.wait_accepted("z", 5.0)
        assert not answers.cancelled("yes") and "yes" not in answers._rooms  # noqa: SLF001
        for i in range(4):  # bounded: the oldest asked room's state goes, and it reads as unanswered
            answers.asked(f"x{i}")
            send_frame(b, Opened(f"x{i}", ok=True))
        answers.wait_accepted("x3", 5.0)
        with pytest.raises(nk.TransportError, match="no Open waiting"):
            answers.wait_accepted("x0", 5.0)
        with pytest.raises(nk.TransportError, match="no Open waiting"):
            answers.wait_accepted("never-asked", 5.0)
        assert not lost
        answers.asked("never")
        waiting: list[BaseException] = []

        def wait() -> None:
            try:
                answers.wait_accepted("never", 30.0)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                waiting.append(exc)

        t = threading.Thread(target=wait)
        t.start()
        b.close()  # the receiver goes away: the wait ends now, not at its deadline
        t.join(5.0)
        assert not t.is_alive() and "closed the connection" in str(waiting[0])
        assert lost == ["the decode side closed the connection"]
    finally:
        answers.stop(2.0)
        a.close()


def test_a_missing_answer_fails_the_connection_so_the_next_room_reconnects() -> None:
    a, b = socket.socketpair()
    lost: list[str] = []
    answers = Answers(a, "test", lost.append)
    try:
        answers.asked("r")
        with pytest.raises(nk.TransportError, match="did not answer room 'r'"):
            answers.wait_accepted("r", 0.2)
        assert lost and "did not answer" in lost[0] and answers.error == lost[0]
        answers.asked("s")
        with pytest.raises(nk.TransportError, match="did not answer room 'r'"):  # at once: the connection is done
            answers.wait_accepted("s", 30.0)
    finally:
        answers.stop(2.0)
        a.close()
        b.close()

"""Handshake refusals, unknown rooms, hostile bytes, the fake backend, clean shutdown, probing."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgspec
import pytest
import torch

import nvshmem_kv as nk
from nvshmem_kv.shm_segment import ShmSegment
from tests.transport.helpers import make_desc
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


def pair(backend: str, dst: nk.PoolDescriptor, made: list[nk.KVTransport]) -> tuple[
        nk.KVTransport, torch.Tensor, nk.PoolHandle, nk.KVTransport]:
    rx, tx = nk.create(backend, run_id="p"), nk.create(backend, run_id="p")
    made += [rx, tx]
    pool = rx.allocate_pool(dst)
    return rx, pool, rx.register_pool(pool, dst), tx




@pytest.mark.parametrize("field,kwargs", [("dtype", {"dtype": "float32"}), ("page_size", {"page_size": 8}),
                                          ("num_layers", {"layers": 5}), ("head_dim", {"head_dim": 16}),
                                          ("total_kv_heads", {"heads": 4})])
@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_connect_refuses_mismatch_naming_field(backend: str, field: str, kwargs: dict[str, object],
                                               receivers: list[nk.KVTransport]) -> None:
    _, _, handle, tx = pair(backend, make_desc(), receivers)
    start = time.monotonic()
    with pytest.raises(nk.TransportError, match=field):
        tx.connect(handle, make_desc(**kwargs), timeout_s=2.0)
    assert time.monotonic() - start < 1.0


def test_receiver_refuses_mismatch_too(receivers: list[nk.KVTransport]) -> None:
    """A forged handle passes the sender's check; the receiver's Hello check still refuses."""
    _, _, handle, tx = pair("tcp", make_desc(), receivers)
    forged = msgspec.structs.replace(handle, descriptor=make_desc(page_size=8))
    with pytest.raises(nk.TransportError, match="refused.*page_size"):
        tx.connect(forged, make_desc(page_size=8), timeout_s=2.0)
    stale = msgspec.structs.replace(handle, token="not-the-token")
    with pytest.raises(nk.TransportError, match="bad token"):
        tx.connect(stale, make_desc(), timeout_s=2.0)
    with pytest.raises(nk.TransportError, match="backend"):
        nk.create("shm").connect(handle, make_desc())


def test_connect_to_nobody_fails_within_deadline() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handle = nk.PoolHandle(backend="tcp", descriptor=make_desc(), host="127.0.0.1", port=port, token="x")
    with nk.create("tcp") as tx, pytest.raises(nk.TransportError, match="cannot reach"):
        tx.connect(handle, make_desc(), timeout_s=1.0)
    silent = socket.create_server(("127.0.0.1", 0))      # accepts, never answers the Hello
    try:
        handle = msgspec.structs.replace(handle, port=silent.getsockname()[1])
        start = time.monotonic()
        with nk.create("tcp") as tx, pytest.raises(nk.TransportError):
            tx.connect(handle, make_desc(), timeout_s=0.5)
        assert time.monotonic() - start < 2.0
    finally:
        silent.close()


@pytest.mark.parametrize("backend", ["shm", "tcp", "fake"])
def test_unknown_room_signals_and_writes_are_dropped(backend: str, receivers: list[nk.KVTransport]) -> None:
    d = make_desc(8)
    rx, pool, handle, tx = pair(backend, d, receivers)
    peer = tx.connect(handle, d)
    src = torch.ones(d.shape, dtype=torch.bfloat16)
    if backend == "tcp":  # its receiver drops the data frames of a room it does not hold: no wait for the answer
        tx.write(peer, "ghost", 0, src, [0], [1])
    else:
        with pytest.raises(nk.TransportError, match="refused room 'ghost'"):  # asked first, written never
            tx.write(peer, "ghost", 0, src, [0], [1])
    tx.signal(peer, "ghost", b"x")
    rx.expect("late", 1, 10.0)
    rx.release("late")
    tx.signal(peer, "late", b"y")
    tx.flush(peer, 5.0)
    wait_until(lambda: rx.stats().signals_dropped == 2, 5.0, 0.01, what="2 dropped signals")
    with pytest.raises(nk.TransportError, match="never expected"):
        rx.poll("ghost")
    s = rx.stats()
    assert s.rooms_pending == 0 and s.rooms_done == 0 and not rx.drain_completed()
    assert tx.stats().writes == (backend == "tcp") and not pool.any()  # one-sided backends: nothing written
    if backend == "tcp":
        wait_until(lambda: rx.stats().writes_dropped == 1, 5.0, 0.01, what="the dropped data frame")


def test_duplicate_signal_completes_once(receivers: list[nk.KVTransport]) -> None:
    d = make_desc(4)
    rx, _, handle, tx = pair("tcp", d, receivers)
    peer = tx.connect(handle, d)
    rx.expect("r", 1, 10.0)
    tx.signal(peer, "r", b"a")
    tx.signal(peer, "r", b"b")
    tx.flush(peer, 5.0)
    wait_until(lambda: rx.stats().signals_dropped == 1, 5.0, 0.01, what="1 dropped signal")
    assert rx.poll("r").payloads == (b"a",)
    assert [n for n, _ in rx.drain_completed()] == ["r"]


def test_fake_backend_completes_and_moves_nothing(receivers: list[nk.KVTransport]) -> None:
    d = make_desc(8)
    rx, pool, handle, tx = pair("fake", d, receivers)
    peer = tx.connect(handle, d)
    rx.expect("f", 1, 10.0)
    for layer in range(d.num_layers):
        tx.write(peer, "f", layer, torch.ones(d.shape, dtype=torch.bfloat16), [0, 1], [2, 3])
    tx.signal(peer, "f", b"first-token")
    st = rx.wait("f", 5.0)
    assert st.done and st.payloads == (b"first-token",)
    assert not pool.any()


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_an_abandoned_room_fails_at_once_and_is_quiet_once_the_close_lands(backend: str,
                                                                           receivers: list[nk.KVTransport]) -> None:
    """One-sided writes land in the decode pool unasked: a room's pages are reusable only when its sender
    says it stopped (Close, behind its copies) or is gone. A room it never wrote gets no Close."""
    d = make_desc(8)
    rx, _, handle, tx = pair(backend, d, receivers)
    peer = tx.connect(handle, d)
    rx.expect("r", 1, 30.0)
    tx.write(peer, "r", 0, torch.ones(d.shape, dtype=torch.bfloat16), [0, 1], [2, 3])
    rx.expect("marker", 1, 30.0)  # frames arrive in order: once this signal is in, so is r's Open
    tx.signal(peer, "marker")
    assert rx.wait("marker", 5.0).done
    rx.release("r")  # the decode side gave up on it (a lease passed, the router aborted it) ...
    assert not rx.quiet("r")  # ... but the sender may still be writing
    tx.abandon(peer, "r")
    wait_until(lambda: rx.quiet("r"), 5.0, 0.01, what="the close")
    rx.expect("s", 1, 30.0)
    tx.write(peer, "s", 0, torch.ones(d.shape, dtype=torch.bfloat16), [0], [4])
    tx.abandon(peer, "s")  # before the receiver gave up: the room fails at once, not at its deadline
    st = rx.wait("s", 5.0)
    assert st.failed and "gave the room up" in st.reason
    tx.abandon(peer, "never-written")  # sends nothing: the next frame is the one the receiver sees
    rx.expect("t", 1, 30.0)
    tx.signal(peer, "t", b"ok")
    assert rx.wait("t", 5.0).done and rx.stats().signals_dropped == 0


def test_write_argument_checks(receivers: list[nk.KVTransport]) -> None:
    d = make_desc(8)
    _, _, handle, tx = pair("shm", d, receivers)
    peer = tx.connect(handle, d)
    src = torch.zeros(d.shape, dtype=torch.bfloat16)
    with pytest.raises(nk.TransportError, match="dst_pages"):
        tx.write(peer, "r", 0, src, [0], [8])
    with pytest.raises(nk.TransportError, match="src_pages"):
        tx.write(peer, "r", 0, src, [-1], [0])
    with pytest.raises(nk.TransportError, match="layer"):
        tx.write(peer, "r", 3, src, [0], [0])
    with pytest.raises(nk.TransportError, match="dtype"):
        tx.write(peer, "r", 0, src.float(), [0], [0])
    with pytest.raises(nk.TransportError, match="2 pages"):
        tx.write(peer, "r", 0, src, [0, 1], [0])
    with pytest.raises(nk.TransportError, match="payload"):
        tx.signal(peer, "r", b"x" * (2 << 20))


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\n\r\n", struct.pack("!IQ", 1 << 31, 0),
                                  struct.pack("!IQ", 5, 0) + b"\xc1\xc1\xc1\xc1\xc1"])
def test_hostile_bytes_drop_only_that_connection(junk: bytes, receivers: list[nk.KVTransport]) -> None:
    d = make_desc(4)
    rx, _, handle, tx = pair("tcp", d, receivers)
    with socket.create_connection((handle.host, handle.port), timeout=5) as s:
        s.sendall(junk)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass            # the receiver closes the connection
        except (ConnectionResetError, TimeoutError):
            pass
    peer = tx.connect(handle, d)
    rx.expect("ok", 1, 10.0)
    tx.signal(peer, "ok", b"")
    assert rx.wait("ok", 5.0).done


def test_unlisted_frames_after_hello_kill_the_connection_and_its_rooms(receivers: list[nk.KVTransport]) -> None:
    d = make_desc(4)
    rx, _, handle, tx = pair("shm", d, receivers)
    peer = tx.connect(handle, d)
    rx.expect("r", 1, 30.0)
    tx.write(peer, "r", 0, torch.zeros(d.shape, dtype=torch.bfloat16), [0], [0])
    tx.flush(peer, 5.0)
    from nvshmem_kv.sender import Outgoing
    from nvshmem_kv.wire import Write

    # shm carries no page data on the channel: a Write frame is a protocol violation
    peer.send(Outgoing(Write("r", 0, 0, 3, [(0, 1)])), 5.0)  # type: ignore[attr-defined]
    st = rx.wait("r", 5.0)
    assert st.failed and "ProtocolError" in st.reason


def test_close_frees_threads_sockets_and_shm() -> None:
    before = {t.name for t in threading.enumerate()}
    d = make_desc(4)
    rx, tx = nk.create("shm", run_id="close"), nk.create("shm", run_id="close")
    pool = rx.allocate_pool(d)
    handle = rx.register_pool(pool, d)
    peer = tx.connect(handle, d)
    rx.expect("r", 1, 30.0)
    tx.write(peer, "r", 0, torch.zeros(d.shape, dtype=torch.bfloat16), [0], [0])
    del pool
    tx.close()
    wait_until(lambda: rx.poll("r").failed, 5.0, 0.01, what="room r to fail")  # the sender left without signalling
    rx.close()
    with pytest.raises(nk.TransportError, match="cannot open"):
        ShmSegment.attach(handle.shm_name, 1)
    wait_until(lambda: not {t.name for t in threading.enumerate() if t.name.startswith("kv-")} - before, 5.0, 0.01,
               what="the kv- threads to exit")
    with pytest.raises(nk.TransportError, match="closed"):
        rx.expect("again", 1, 1.0)


def test_shm_names_come_from_run_id(receivers: list[nk.KVTransport]) -> None:
    _, _, h1, _ = pair("shm", make_desc(), receivers)
    _, _, h2, _ = pair("shm", make_desc(), receivers)
    assert h1.shm_name.startswith("pdbox-p-kv0-") and h1.shm_name != h2.shm_name
    assert h1.port != h2.port and h1.port > 0


def test_probe_on_cpu_picks_shm_and_says_why() -> None:
    result = nk.probe("cpu")
    assert result.backend == "shm"
    verdicts = {e.backend: e for e in result.entries}
    assert [e.backend for e in result.entries] == list(nk.PROBE_ORDER)
    if not torch.cuda.is_available():
        assert not verdicts["nvshmem"].ok and "cuda" in verdicts["nvshmem"].reason.lower()
        assert not verdicts["cuda_ipc"].ok and "cuda" in verdicts["cuda_ipc"].reason.lower()
    assert "shm" in result.summary()
    assert nk.probe("cpu", same_host=False).backend == "tcp"


def test_create_refuses_gpu_backends_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    for name in ("cuda_ipc", "nvshmem"):
        with pytest.raises(nk.BackendUnavailable, match="cuda"):
            nk.create(name, device="cuda")
    with pytest.raises(ValueError, match="unknown"):
        nk.create("carrier-pigeon")

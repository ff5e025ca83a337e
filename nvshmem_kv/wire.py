"""Control-channel framing: ``!IQ`` (header length, payload length), a msgpack header, raw bytes.

Every header is one of the tagged msgspec structs below; nothing read from a socket is ever
unpickled or evaluated. Limits are checked before anything is allocated.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from typing import TypeVar

import msgspec

from nvshmem_kv.descriptor import PoolDescriptor
from nvshmem_kv.errors import ProtocolError, TransportError

PROTOCOL_VERSION = 3  # 2: `Close`; 3: `Opened`, `Cancel` (the receiver answers)
PREFIX = struct.Struct("!IQ")
MAX_HEADER_BYTES = 1 << 20
MAX_SIGNAL_PAYLOAD = 1 << 20
MAX_DATA_PAYLOAD = 1 << 34
_CHUNK = 1 << 20


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """First frame from a sender: who it is and which pool it wants to write."""

    version: int
    token: str
    backend: str
    src: PoolDescriptor


class HelloAck(msgspec.Struct, frozen=True, tag="ack"):
    ok: bool
    error: str = ""


class Open(msgspec.Struct, frozen=True, tag="open"):
    """The sender asks to write ``room``; it writes nothing before the receiver's `Opened` accepts it.
    Once accepted, the receiver keeps the room's pages until this sender signals or closes the room
    (or its connection is gone), and if its connection dies while the room is pending, the room fails."""

    room: str


class Opened(msgspec.Struct, frozen=True, tag="opened"):
    """Receiver -> sender: the answer to an `Open`. ``ok``: the room is pending and this sender is
    recorded as its writer; otherwise ``error`` says why not (unknown, released, failed) and the
    sender must not write it."""

    room: str
    ok: bool
    error: str = ""


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    """Receiver -> sender: the receiver gave ``room`` up (failed, aborted) while this sender had opened
    it: write no more of it, and `Close` it (behind the writes already made) so its pages go back."""

    room: str


class Close(msgspec.Struct, frozen=True, tag="close"):
    """The sender stops writing ``room`` without signalling it (the request was aborted or failed): sent
    behind the same fence as a Signal, so every write it made has landed. The room fails at once, and
    once every sender that opened it has signalled or closed it (or is gone), its pages may be reused."""

    room: str


class Write(msgspec.Struct, frozen=True, tag="write"):
    """Page data for one layer (tcp backend). Payload: K runs then V runs, each run
    ``(n, page_size, head_count, head_dim)`` contiguous, in ``runs`` order."""

    room: str
    layer: int
    head_start: int
    head_count: int
    runs: list[tuple[int, int]]      # (dst_page_start, num_pages)


class Signal(msgspec.Struct, frozen=True, tag="signal"):
    """All writes of ``room`` from this sender are visible; payload = caller's bytes.
    nvshmem only: ``puts`` is the sender's cumulative put count towards this receiver, which the
    receiver checks against the signal word of PE ``src_pe``."""

    room: str
    puts: int = 0
    src_pe: int = -1


Message = Hello | HelloAck | Open | Opened | Cancel | Close | Write | Signal
M = TypeVar("M", Hello, HelloAck)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_frame(msg: Message, payload_len: int = 0) -> bytes:
    header = _encoder.encode(msg)
    return PREFIX.pack(len(header), payload_len) + header


def send_frame(sock: socket.socket, msg: Message, payload: Iterable[memoryview | bytes] = ()) -> int:
    """Send one frame; returns the payload bytes sent."""
    parts = [memoryview(p).cast("B") for p in payload]
    total = sum(p.nbytes for p in parts)
    head = encode_frame(msg, total)
    if total <= 4096:
        sock.sendall(b"".join([head, *parts]))
    else:
        sock.sendall(head)
        for part in parts:
            sock.sendall(part)
    return total


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    view = view.cast("B")
    got = 0
    while got < view.nbytes:
        n = sock.recv_into(view[got:], min(view.nbytes - got, 1 << 24))
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def discard(sock: socket.socket, nbytes: int) -> None:
    scratch = memoryview(bytearray(min(nbytes, _CHUNK)))
    while nbytes > 0:
        n = min(nbytes, scratch.nbytes)
        recv_into_exact(sock, scratch[:n])
        nbytes -= n


def recv_header(sock: socket.socket, max_payload: int = MAX_DATA_PAYLOAD) -> tuple[Message, int]:
    """Read one frame header; the caller must then consume exactly ``payload_len`` bytes."""
    header_len, payload_len = PREFIX.unpack(recv_exact(sock, PREFIX.size))
    if header_len > MAX_HEADER_BYTES or payload_len > max_payload:
        raise ProtocolError(f"frame too large (header {header_len} B, payload {payload_len} B)")
    try:
        msg = _decoder.decode(recv_exact(sock, header_len))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"undecodable frame header: {exc}") from exc
    return msg, payload_len


def expect_message(sock: socket.socket, kind: type[M]) -> M:
    """Read one payload-less frame of type ``kind`` (the handshake)."""
    msg, _ = recv_header(sock, max_payload=0)
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
    return msg


def check_ack(ack: HelloAck) -> None:
    if not ack.ok:
        raise TransportError(f"peer refused the connection: {ack.error}")

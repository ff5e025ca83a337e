"""The control channel: a TCP listener on the receiver (ephemeral port, one reader thread per
sender) and the sender's handshake. Every backend uses it for Hello/Open/Signal; tcp also
carries page data over it. The receiver answers on the same socket (`Opened`, `Cancel`: small
frames, sent under a per-connection lock with a send deadline; the sender's `Answers` reads them)."""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from nvshmem_kv.descriptor import PoolDescriptor
from nvshmem_kv.errors import TransportError
from nvshmem_kv.wire import Hello, HelloAck, Message, check_ack, expect_message, recv_header, send_frame

_ACCEPT_POLL_S = 0.2
_SOCK_BUF = 4 << 20
ANSWER_SEND_S = 10  # the longest an answer to a sender may block (a sender that reads nothing is dropped)
MAX_CONNECTIONS = 1024          # senders per receiver (a prefill rank keeps one connection)


@dataclass(frozen=True)
class ConnInfo:
    """One accepted sender connection."""

    id: int
    src: PoolDescriptor
    addr: str

    def describe(self) -> str:
        return f"sender tp{self.src.tp_rank}/{self.src.tp_size} at {self.addr}"


class ChannelHandler(Protocol):
    def accept_hello(self, hello: Hello) -> str | None:
        """Return None to accept, or the refusal message sent back to the sender."""

    def on_message(self, conn: ConnInfo, msg: Message, payload_len: int, sock: socket.socket) -> None:
        """Handle one frame; must consume exactly ``payload_len`` payload bytes from ``sock``."""

    def on_closed(self, conn: ConnInfo, reason: str) -> None:
        """The connection ended (cleanly or not)."""


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), val)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


class ControlServer:
    """Accepts senders on ``host`` at an OS-chosen port and feeds their frames to ``handler``."""

    def __init__(self, host: str, handler: ChannelHandler, name: str, hello_timeout_s: float = 5.0) -> None:
        self._handler = handler
        self._hello_timeout_s = hello_timeout_s
        self._sock = socket.create_server((host, 0))
        self._sock.settimeout(_ACCEPT_POLL_S)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[int, tuple[socket.socket, threading.Thread, threading.Lock]] = {}
        self._ids = itertools.count(1)
        self._name = name
        self._thread = threading.Thread(target=self._accept_loop, name=f"kv-listen-{name}", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, drop every connection, join all threads (each within the deadline)."""
        end = time.monotonic() + timeout_s
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)      # wakes accept() at once on Linux
        except OSError:
            pass
        self._thread.join(timeout=max(0.0, end - time.monotonic()))
        self._sock.close()
        with self._lock:
            conns = list(self._conns.values())
        for sock, _, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread, _ in conns:
            thread.join(timeout=max(0.0, end - time.monotonic()))

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS
            if full:
                sock.close()
                continue
            conn_id = next(self._ids)
            thread = threading.Thread(target=self._serve, args=(conn_id, sock, f"{addr[0]}:{addr[1]}"),
                                      name=f"kv-conn-{self._name}-{conn_id}", daemon=True)
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    return
                self._conns[conn_id] = (sock, thread, threading.Lock())
            thread.start()

    def send(self, conn_id: int, msg: Message) -> bool:
        """Send ``msg`` to one sender (any thread); False when that connection is gone or the send failed
        (the connection is then shut down: its reader ends it, `ChannelHandler.on_closed`)."""
        with self._lock:
            entry = self._conns.get(conn_id)
        if entry is None:
            return False
        sock, _, lock = entry
        try:
            with lock:
                send_frame(sock, msg)
        except OSError:  # reset, or the send deadline passed (SO_SNDTIMEO): a sender that reads nothing
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        return True

    def _serve(self, conn_id: int, sock: socket.socket, addr: str) -> None:
        conn: ConnInfo | None = None
        reason = "connection closed"
        try:
            tune_socket(sock)
            sock.settimeout(self._hello_timeout_s)
            hello = expect_message(sock, Hello)
            refusal = self._handler.accept_hello(hello)
            send_frame(sock, HelloAck(ok=refusal is None, error=refusal or ""))
            if refusal is not None:
                return
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", ANSWER_SEND_S, 0))
            conn = ConnInfo(conn_id, hello.src, addr)
            while not self._stop.is_set():
                msg, payload_len = recv_header(sock)
                self._handler.on_message(conn, msg, payload_len, sock)
        except Exception as exc:  # every way a connection ends: EOF, reset, bad frame, handler bug
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            if self._stop.is_set():
                reason = "receiver closed"
            if conn is not None:
                self._handler.on_closed(conn, f"{conn.describe()} disconnected ({reason})")
            with self._lock:
                entry = self._conns.pop(conn_id, None)
            if entry is not None:
                with entry[2]:  # NOTE: not while `send` writes on it (a closed descriptor's number is reused)
                    sock.close()
            else:
                sock.close()


def open_channel(host: str, port: int, hello: Hello, timeout_s: float,
                 send_timeout_s: float) -> socket.socket:
    """Connect, send ``hello``, wait for the ack; raise `TransportError` on refusal or timeout."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise TransportError(f"cannot reach KV receiver at {host}:{port}: {exc}") from exc
    try:
        tune_socket(sock)
        sock.settimeout(timeout_s)
        send_frame(sock, hello)
        check_ack(expect_message(sock, HelloAck))
        sock.settimeout(send_timeout_s)
        return sock
    except TransportError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise TransportError(f"handshake with {host}:{port} failed: {exc}") from exc

"""Helpers of the chaos tier: plain HTTP (no client-side retries), worker state read from the workers
themselves, process facts from /proc, and deadlines on every wait."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tests.serve.appliance_proc import running_appliance
from tests.waiting import wait_until

API_KEY = "chaos-" + "k" * 24
MODEL = "smollm2-135m-instruct"
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Appliance:
    """A running `pdbox up`: its URL, the API key it wants ("" for none), the launcher's pid."""

    url: str
    key: str = ""
    pid: int = 0
    lines: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def workers(self) -> list[dict]:
        status, _, body = http_call("GET", self.url + "/workers", headers=self.headers())
        assert status == 200, body
        return json.loads(body)["workers"]

    def worker(self, role: str) -> dict:
        return next(w for w in self.workers() if w["role"] == role)

    def post(self, path: str, body: Any, timeout: float = 60.0, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else json.dumps(body).encode()
        return http_call("POST", self.url + path, data, {**self.headers(), "Content-Type": "application/json",
                                                         **(headers or {})}, timeout)

    def chat(self, max_tokens: int = 8, timeout: float = 60.0, **kw: Any) -> tuple[int, dict]:
        status, _, body = self.post(CHAT, {"model": MODEL, "messages": QUESTION, "max_tokens": max_tokens,
                                           "temperature": 0, **kw}, timeout)
        return status, json.loads(body)


@contextmanager
def appliance(*args: str, key: str = "", log_dir=None) -> Iterator[Appliance]:
    """`running_appliance` with the API key passed the way users do (PDBOX_API_KEY)."""
    info: dict = {}
    env = {"PDBOX_API_KEY": key} if key else {"PDBOX_API_KEY": ""}
    with running_appliance(*args, env=env, info=info, log_dir=log_dir) as url:
        yield Appliance(url, key, info["pid"], info["lines"])


def http_call(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
              timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One request; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, timeout: float = 5.0) -> dict:
    status, _, body = http_call("GET", url, timeout=timeout)
    assert status == 200, (url, status, body[:200])
    return json.loads(body)


def error_of(body: bytes) -> dict:
    """The OpenAI error object of a response body; fails the test when the shape is wrong."""
    obj = json.loads(body)
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    return err


def loads(app: Appliance) -> dict[str, dict]:
    """Each worker's /load, asked of the worker itself (the router's copy is up to a second old)."""
    return {w["name"]: get_json(w["url"] + "/load") for w in app.workers()}


def pool_idle(load: dict) -> bool:
    return (load["free_pages"] + load["evictable_pages"] == load["total_pages"] and not load["reserved_rooms"]
            and not load["running"] and not load["waiting"])


def wait_pools_idle(app: Appliance, timeout_s: float = 20.0) -> dict[str, dict]:
    """Both engines' free (+ evictable prefix-cache) pages equal their totals again, within a deadline."""
    last: dict[str, dict] = {}

    def idle() -> bool:
        nonlocal last
        last = loads(app)
        return all(pool_idle(ld) for ld in last.values())

    try:
        wait_until(idle, timeout_s, 0.2, what="idle pools")
    except TimeoutError:
        raise AssertionError(f"pages leaked: {last}") from None
    return last


def wait_healthy(app: Appliance, timeout_s: float = 90.0, restarts: dict[str, int] | None = None) -> list[dict]:
    """Every worker healthy in the router's eyes (and restarted at least ``restarts[name]`` times)."""
    def ok() -> list[dict] | None:
        ws = app.workers()
        fine = all(w["healthy"] for w in ws) and all(
            w["restarts"] >= (restarts or {}).get(w["name"], 0) for w in ws)
        return ws if fine else None

    return wait_until(ok, timeout_s, 0.25, what="healthy workers")


# -- processes -----------------------------------------------------------------------------------------
def cluster_token(pid: int) -> str:
    """The cluster token a worker was started with (what a compromised router would know)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return env[b"PDBOX_CLUSTER_TOKEN"].decode()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def listening(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket ``pid`` listens on (IPv4 and IPv6)."""
    return [(ip, port) for ip, port, _, state in _sockets(pid) if state == "0A"]  # 0A: LISTEN


def remote_ports(pid: int) -> set[int]:
    """Peer ports of ``pid``'s TCP connections that are not closed yet (established, close-wait …)."""
    return {rport for _, _, rport, state in _sockets(pid) if state not in ("0A", "07")}  # 07: CLOSE


def _sockets(pid: int) -> list[tuple[str, int, int, str]]:
    """(local ip, local port, remote port, state) of ``pid``'s TCP sockets."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, v6 in (("tcp", False), ("tcp6", True)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for row in f:
                cols = row.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                if inode not in inodes:
                    continue
                hexip, hexport = local.split(":")
                out.append((_ip(hexip, v6), int(hexport, 16), int(remote.split(":")[1], 16), state))
    return out


def _ip(hexip: str, v6: bool) -> str:
    raw = bytes.fromhex(hexip)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


class Stopped:
    """SIGSTOP a process for the duration of a ``with`` block (SIGCONT on the way out, always)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> Stopped:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


# -- SSE -------------------------------------------------------------------------------------------------
class SSE:
    """A streaming request read event by event, which the test may drop (a client that goes away)."""

    def __init__(self, app: Appliance, path: str, body: dict, timeout: float = 60.0) -> None:
        u = urlsplit(app.url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        self.conn.request("POST", path, json.dumps({**body, "stream": True}),
                          {**app.headers(), "Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.started = time.monotonic()

    def events(self) -> Iterator[dict | str]:
        """Parsed ``data:`` payloads (``"[DONE]"`` as a string); ends when the server closes."""
        for raw in self.resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)

    def drop(self) -> None:
        """Vanish like a killed client: shut the socket down and close its descriptor unread.

        NOTE: the response object holds its own reference to the socket; closing only the connection
        would leave the descriptor open (a live client that stopped reading, not a killed one).
        """
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.resp.close()
        self.conn.close()


def in_thread(fn: Callable[[], Any]) -> Callable[[float], Any]:
    """Run ``fn`` on a thread; return a ``join(timeout_s)`` that gives its result or raises its error."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the joiner
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join(timeout_s: float) -> Any:
        t.join(timeout_s)
        if t.is_alive():
            raise AssertionError(f"still running after {timeout_s:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join

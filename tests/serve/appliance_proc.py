"""Start `pdbox up` as a real subprocess for tests; always stop it (and its workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.engine.tp import free_port
from tests.waiting import wait_until


@contextmanager
def running_appliance(*args: str, timeout_s: float = 240.0, log_dir: Path | None = None,
                      env: dict[str, str] | None = None, info: dict | None = None) -> Iterator[str]:
    """Yield the base URL of a running appliance; stop it with SIGTERM and check nothing is left.

    ``env`` is added to this process's environment; ``info`` (when given) receives ``pid`` (the
    launcher, which runs the router) and ``lines`` (its stdout and stderr so far)."""
    port = free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "up", "--port", str(port), *args]
    if not any(a == "--mode" or a.startswith("--mode=") for a in args):
        cmd += ["--mode", "disagg"]  # these tests are of the fixed split; `pdbox up` alone is --mode auto
    own_logs = tempfile.TemporaryDirectory(prefix="pdbox-test-logs-", ignore_cleanup_errors=True) \
        if log_dir is None else None
    cmd += ["--log-dir", str(log_dir) if own_logs is None else own_logs.name]  # NOTE: not left behind in $TMPDIR
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    lines: list[str] = []
    ready = threading.Event()
    if info is not None:
        info.update(pid=proc.pid, lines=lines)

    def pump(stream) -> None:  # NOTE: drain both pipes: a full stderr pipe would block the launcher
        for line in stream:
            lines.append(line)
            del lines[:-2000]
            if line.startswith("ready: "):
                ready.set()

    threading.Thread(target=pump, args=(proc.stdout,), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr,), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.5)
                raise RuntimeError(f"pdbox up did not become ready: {''.join(lines)}")
        url = next(ln for ln in lines if ln.startswith("ready: ")).split()[1]
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if own_logs is not None:
            own_logs.cleanup()


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def workers(url: str, headers: dict[str, str] | None = None) -> list[dict]:
    return get_json(url + "/workers", headers)["workers"]


def wait_idle(url: str, timeout_s: float = 20.0) -> list[dict]:
    """Wait until every engine is idle, then return the workers (load info refreshed each second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ws = workers(url)
        idle = all(w["load"].get("running", 1) == 0 and w["load"].get("waiting", 1) == 0
                   and w["load"].get("reserved_rooms", 1) == 0 for w in ws)
        if idle or time.monotonic() > deadline:
            return ws
        time.sleep(0.5)


def assert_pools_idle(url: str, timeout_s: float = 20.0) -> None:
    """Every worker's pool is back to idle (free + evictable == total, no reserved rooms), asked of
    each worker directly; failed handoffs keep their pages in a short quarantine, hence the wait."""
    leaks: list[dict] = []

    def idle() -> bool:
        nonlocal leaks
        loads = [get_json(w["url"] + "/load") for w in workers(url)]
        leaks = [ld for ld in loads if ld["free_pages"] + ld["evictable_pages"] != ld["total_pages"]
                 or ld["reserved_rooms"] or ld["running"] or ld["waiting"]]
        return not leaks

    try:
        wait_until(idle, timeout_s, 0.25, what="idle pools")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: {leaks}") from None

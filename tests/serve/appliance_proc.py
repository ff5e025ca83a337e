"""Start `pdbox up` as a real subprocess for tests; always stop it (and its workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.engine.tp import free_port


@contextmanager
def running_appliance(*args: str, timeout_s: float = 240.0, log_dir: Path | None = None) -> Iterator[str]:
    """Yield the base URL of a running appliance; stop it with SIGTERM and check nothing is left."""
    port = free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "up", "--port", str(port), *args]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready: "):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.poll() is not None and proc.stderr else ""
                raise RuntimeError(f"pdbox up did not become ready: {''.join(lines)} {err}")
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


def assert_pools_idle(url: str) -> None:
    time.sleep(1.5)  # one health refresh
    for w in wait_idle(url):
        load = w["load"]
        assert load["free_pages"] + load["evictable_pages"] == load["total_pages"], f"{w['name']} leaked pages: {load}"
        assert load["reserved_rooms"] == 0, w

"""A ``pdbox up`` for a bench: started on a free port with its console kept aside, ready once its router
lists the model, stopped (SIGINT, then SIGKILL) when the bench is done with it."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from appliance.engine.tp import free_port


@dataclass(frozen=True)
class Up:
    proc: subprocess.Popen
    url: str
    ready_s: float  # from the launch until GET /v1/models answered 200


@contextmanager
def running_up(up_args: tuple[str, ...], timeout_s: float, stop_timeout_s: float) -> Iterator[Up]:
    """``pdbox up --port P --no-monitor UP_ARGS``, serving; raises when it exits first or is not ready
    within ``timeout_s`` (its console's last lines in the message). Its workers' logs go to a folder
    removed after, unless ``UP_ARGS`` name one (``--log-dir``): a bench starts many."""
    port = free_port()
    cmd = [sys.executable, "-m", "appliance.cli", "up", "--port", str(port), "--no-monitor", *up_args]
    logs = None
    if not any(a == "--log-dir" or a.startswith("--log-dir=") for a in up_args):
        logs = tempfile.TemporaryDirectory(prefix="pdbox-bench-logs-", ignore_cleanup_errors=True)
        cmd += ["--log-dir", logs.name]
    log = tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"pdbox up exited with {proc.returncode} before serving:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=1.0) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"pdbox up did not serve within {timeout_s:.0f} s")
            time.sleep(0.05)
        yield Up(proc, url, time.perf_counter() - t0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(stop_timeout_s)
        log.close()
        if logs is not None:
            logs.cleanup()

"""Drive a program in a detached tmux pane of a fixed size (its own tmux server, killed after)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.waiting import wait_until

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (apt-get install -y tmux)")


class Pane:
    def __init__(self, argv: list[str], width: int = 80, height: int = 24, cwd: str | None = None) -> None:
        self.socket = f"pdbox-test-{os.getpid()}-{time.monotonic_ns()}"
        # NOTE: the shell line keeps the pane open after the program exits, and shows its exit status.
        line = f"{shlex.join(argv)}; echo exited-$?; sleep 600"
        self._tmux("new-session", "-d", "-s", "main", "-x", str(width), "-y", str(height), line, cwd=cwd)

    def _tmux(self, *args: str, cwd: str | None = None) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
                             cwd=cwd, timeout=10)
        return out.stdout

    def capture(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "main")

    def send_keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "main", *keys)

    def wait_for(self, ok: Callable[[str], bool], timeout_s: float, what: str) -> str:
        screen = ""

        def shows() -> bool:
            nonlocal screen
            screen = self.capture()
            return ok(screen)

        try:
            wait_until(shows, timeout_s, 0.2, what=what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; the pane shows:\n{screen}") from None
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)

"""`pdbox up` on a terminal (tmux, 80x24): start-up progress, the `ready:` line, then the dashboard."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from appliance.engine.tp import free_port
from tests.monitor.tmux import Pane, needs_tmux

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@needs_tmux
def test_up_shows_progress_then_ready_then_the_dashboard(tmp_path: Path) -> None:
    port = free_port()
    pane = Pane([sys.executable, "-m", "appliance.cli", "up", "--port", str(port), "--dtype", "float32",
                 "--log-dir", str(tmp_path)],
                cwd=str(ROOT))
    try:
        pane.wait_for(lambda s: "loading model" in s and "prefill-0" in s, 60, "start-up progress")
        screen = pane.wait_for(lambda s: re.search(r"^TTFT", s, re.M) is not None, 180, "dashboard")
        assert f"ready: http://127.0.0.1:{port}" in screen.splitlines()  # the line scripts parse, intact
        assert "loading model" not in screen  # the progress display is gone
        # the default mode is auto: both engines can do both, leaning as --prefill/--decode-gpus split them
        assert re.search(r"^prefill-0\s+auto:prefill\s", screen, re.M), screen
        assert re.search(r"^decode-0\s+auto:decode\s", screen, re.M), screen
        body = {"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 4}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
        pane.wait_for(lambda s: "requests 1 " in s, 15, "the request counted on the dashboard")
        pane.send_keys("C-c")
        pane.wait_for(lambda s: "exited-0" in s, 60, "clean shutdown on Ctrl-C")
    finally:
        pane.close()

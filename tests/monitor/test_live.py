"""`pdbox monitor` against a real `pdbox up` (CPU, embedded model): --once, and live in tmux."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.monitor.tmux import Pane, needs_tmux
from tests.serve.appliance_proc import running_appliance

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FRAME = ROOT / "docs" / "monitor-frame.txt"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_appliance("--dtype", "float32") as u:
        yield u


def ask(url: str, text: str, max_tokens: int = 12) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200


def monitor_argv(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", "monitor", "--url", url, *extra]


def figure(screen: str, pattern: str) -> str:
    m = re.search(pattern, screen, re.MULTILINE)
    assert m, f"{pattern!r} not on screen:\n{screen}"
    return m.group(1)


def test_once_shows_both_workers_throughput_and_ttft(url: str) -> None:
    for q in ("What is the capital of France?", "Name three colors.", "Say hello in Spanish."):
        ask(url, q)
    out = subprocess.run(monitor_argv(url, "--once"), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "\x1b[" not in text, "no TTY: plain text expected"
    rows = {m.group(1): m.group(2).split() for m in re.finditer(r"^((?:prefill|decode)-0)\s+(.*)$", text, re.M)}
    assert set(rows) == {"prefill-0", "decode-0"}, text
    assert rows["prefill-0"][0] == "prefill" and rows["decode-0"][0] == "decode"
    for name, cols in rows.items():
        assert float(cols[-2]) > 0, f"{name} shows no tokens/s:\n{text}"
        assert cols[-1] == "ok"
    ttft = figure(text, r"^TTFT\s+(\d+(?:\.\d+)? m?s)\s")
    assert ttft and int(figure(text, r"^TTFT\s+\S+ m?s\s+\S+ m?s\s+(\d+)")) >= 3
    assert re.search(r"^shm\s+\d", text, re.M), text  # the KV transfer row


@needs_tmux
def test_live_view_in_tmux_refreshes_after_a_request(url: str, tmp_path: Path) -> None:
    pane = Pane(monitor_argv(url, "--interval", "0.5"), cwd=str(ROOT))
    try:
        before = pane.wait_for(lambda s: re.search(r"^TTFT", s, re.M) is not None, 30, "dashboard")
        count = int(figure(before, r"requests (\d+)"))
        ask(url, "Why is the sky blue?")
        after = pane.wait_for(lambda s: f"requests {count + 1}" in s, 15, "refreshed request count")
        assert figure(after, r"^(last \d+s|all time)\s+p50") and figure(after, r"^TTFT\s+(\d+(?:\.\d+)? m?s)")
        lines = after.splitlines()
        assert len(lines) <= 24 and all(len(ln) <= 80 for ln in lines)
        assert "prefill-0" in after and "decode-0" in after
        (tmp_path / "frame.txt").write_text(after)
        if os.environ.get("PDBOX_WRITE_FRAME"):  # refresh the README's picture: PDBOX_WRITE_FRAME=1 pytest …
            FRAME.parent.mkdir(exist_ok=True)
            FRAME.write_text(after.rstrip() + "\n")
        pane.send_keys("C-c")
        pane.wait_for(lambda s: "exited-0" in s, 10, "clean exit on Ctrl-C")
    finally:
        pane.close()

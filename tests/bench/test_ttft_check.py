"""scripts/ttft_check.py's CPU smoke run, as its docstring gives it: both modes through real `pdbox up`,
with the report's split of TTFT into the router's part, the engine's and its forward steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def test_cpu_smoke_reports_where_ttft_goes(tmp_path: Path) -> None:
    out = tmp_path / "ttft.json"
    args = ["--cpu", "--prompt-tokens", "96", "--layers", "1", "--hidden", "64", "--heads", "2", "--kv-heads", "1",
            "--intermediate", "128", "--requests", "2", "--max-share", "1", "--out", str(out)]
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "ttft_check.py"), *args], capture_output=True,
                         text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and "engine TTFT unified" in run.stdout
    for mode, role in (("unified", "unified"), ("disagg", "prefill")):
        assert 0 < report[f"{role}_step_ms"] <= report[f"{role}_engine_ttft_ms"] <= report[f"{mode}_ttft_ms"]
        assert report[f"{role}_steps"] >= 1
    assert 0 <= report["handoff_tail_ms"] < report["disagg_ttft_ms"]

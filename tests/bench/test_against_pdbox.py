"""A short `pdbox bench run` against a real `pdbox up`: checks the JSON, not speed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.serve.appliance_proc import running_appliance

pytestmark = pytest.mark.slow


def test_bench_run_against_pdbox_up(tmp_path) -> None:
    with running_appliance() as url:
        out = subprocess.run(
            [sys.executable, "-m", "appliance.cli", "bench", "run", "--url", url, "--workload", "mixed", "--rate", "4",
             "--num-requests", "4", "--seed", "3", "--out", str(tmp_path), "--warmup", "0"],
            capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == 4 and not any(result["errors"])
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "request_goodput"):
        assert key in result, key
    assert result["mean_ttft_ms"] > 0 and result["total_output_tokens"] >= 4
    assert result["output_lens"] == [n for n in result["output_lens"] if n > 0]

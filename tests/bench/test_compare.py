"""`bench compare`: launching modes as subprocesses, stopping them, and the report it writes."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.cli import BenchContext, bench
from bench.compare import LaunchConfig, LaunchedServer
from bench.report import adaptive_check, verdict
from bench.server_state import delta, parse_decisions
from bench.workloads import TextCodec
from tests.bench.conftest import HERE, ThreadServer
from tests.bench.fake_server import make_app

PY = shlex.quote(sys.executable)


def _python(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


def test_launch_template_placeholders() -> None:
    launch = LaunchConfig("pdbox up --mode {mode} --host {host} --port {port}", host="127.0.0.2")
    assert launch.command("disagg", 8123) == [
        "pdbox",
        "up",
        "--mode",
        "disagg",
        "--host",
        "127.0.0.2",
        "--port",
        "8123",
    ]
    with pytest.raises(ValueError, match=r"\{mode\}"):
        LaunchConfig("serve --gpu {gpu}")


def test_mode_with_cores_per_engine() -> None:
    launch = LaunchConfig("pdbox up --mode {mode} --port {port}")
    assert launch.command("unified@2", 9) == ["pdbox", "up", "--mode", "unified", "--port", "9",
                                              "--cores-per-engine", "2"]
    with pytest.raises(ValueError, match="NAME@N"):
        launch.command("unified@two", 9)


def test_a_server_that_dies_before_ready_is_reported(tmp_path: Path) -> None:
    async def go() -> None:
        async with LaunchedServer(
            LaunchConfig(_python("import sys; print('boom'); sys.exit(3)")), "unified", tmp_path / "log"
        ):
            pass

    with pytest.raises(RuntimeError, match="exited with code 3"):
        asyncio.run(go())
    assert "boom" in (tmp_path / "log").read_text()


def test_no_ready_line_times_out_and_the_server_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    async def go() -> None:
        async with LaunchedServer(LaunchConfig(_python(code), ready_timeout_s=1.0), "unified", tmp_path / "log"):
            pass

    with pytest.raises(RuntimeError, match="no ready line"):
        asyncio.run(go())
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_server_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('ready: http://127.0.0.1:1/', flush=True); time.sleep(60)"
    )

    async def go() -> str:
        async with LaunchedServer(LaunchConfig(_python(code), stop_timeout_s=0.3), "disagg", tmp_path / "log") as url:
            return url

    start = time.monotonic()
    assert asyncio.run(go()) == "http://127.0.0.1:1"
    assert time.monotonic() - start < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_compare_runs_each_mode_and_writes_the_report(codec: TextCodec, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    launch = f"{PY} {shlex.quote(str(HERE / 'fake_server.py'))} --mode {{mode}} --host {{host}} --port {{port}}"
    with ThreadServer(make_app()) as peer:
        args = [
            "compare",
            "--launch",
            launch,
            "--rates",
            "100,200",
            "--num-requests",
            "6",
            "--warmup",
            "1",
            "--isolated-per-bucket",
            "1",
            "--peer-url",
            peer.url,
            "--out",
            str(out),
        ]
        result = CliRunner().invoke(bench, args, obj=BenchContext(load_codec=lambda path: codec))
    assert result.exit_code == 0, result.output + repr(result.exception)

    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["modes"]) == ["unified", "disagg", "peer"]
    assert summary["workload"] == "mixed" and summary["reference_rate"] in (100.0, 200.0)
    for mode in summary["modes"].values():
        for key in ("goodput", "p50_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "p50_ttft_ms", "p99_ttft_ms"):
            assert isinstance(mode[key], float), key
        assert mode["goodput"] in (0.0, 100.0, 200.0)
        assert [row["rate"] for row in mode["sweep"]] == [100.0, 200.0]
    assert summary["slo"]["kind"] == "relative"
    assert (summary["slo"]["k_ttft"], summary["slo"]["k_tpot"], summary["slo"]["ttft_slack_s"]) == (4.0, 1.5, 0.5)
    smap = summary["slo_map"]
    assert smap["k_ttft"] == [2.0, 4.0, 8.0] and smap["k_tpot"] == [1.25, 1.5, 2.0, 3.0]
    for name, grid in smap["goodput"].items():
        assert len(grid) == 3 and all(len(row) == 4 for row in grid)
        for row in grid:  # a looser TPOT limit never lowers goodput
            assert row == sorted(row)
        assert grid[1][1] == summary["modes"][name]["goodput"]  # (k_ttft 4, k_tpot 1.5) is the default SLO
    assert summary["verdict"] == verdict(summary)

    # Every mode got the same seeded requests, and the launched ones started and stopped cleanly.
    for rate in ("100", "200"):
        lens = [json.loads((out / m / f"rate_{rate}.json").read_text())["input_lens"] for m in summary["modes"]]
        assert lens[0] == lens[1] == lens[2]
    for mode in ("unified", "disagg"):
        log = (out / mode / "server.log").read_text()
        assert f"fake server mode={mode}" in log and "ready: http://127.0.0.1:" in log and "stopped" in log
    assert json.loads((out / "isolated.json").read_text())["mode"] == "unified"

    report = (out / "report.md").read_text()
    assert report.startswith("# pdbox compare: unified vs disagg vs peer")
    assert "**Verdict.**" in report and "## SLO map" in report and "| k_ttft \\ k_tpot |" in report
    for png in ("ttft_cdf", "tpot_cdf", "goodput_vs_rate", "p99_vs_rate"):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"({png}.png)" in report

    (out / "report.md").unlink()
    redo = CliRunner().invoke(bench, ["report", str(out)])
    assert redo.exit_code == 0 and (out / "report.md").read_text() == report


def test_interleaved_compare_runs_each_mode_per_rate_on_a_fresh_server_with_the_same_requests(
    codec: TextCodec, tmp_path: Path
) -> None:
    launch = f"{PY} {shlex.quote(str(HERE / 'fake_server.py'))} --mode {{mode}} --host {{host}} --port {{port}}"

    def run(out: Path, *order: str) -> None:
        args = ["compare", "--launch", launch, "--rates", "100,200", "--num-requests", "5", "--warmup", "1",
                "--isolated-per-bucket", "1", "--out", str(out), *order]
        result = CliRunner().invoke(bench, args, obj=BenchContext(load_codec=lambda path: codec))
        assert result.exit_code == 0, result.output + repr(result.exception)

    run(tmp_path / "by-mode")
    run(tmp_path / "inter", "--interleave")
    inter = tmp_path / "inter"
    summary = json.loads((inter / "compare.json").read_text())
    assert summary["order"] == "interleaved" and list(summary["modes"]) == ["unified", "disagg"]
    assert json.loads((tmp_path / "by-mode" / "compare.json").read_text())["order"] == "by-mode"
    for mode in ("unified", "disagg"):
        assert [row["rate"] for row in summary["modes"][mode]["sweep"]] == [100.0, 200.0]
        assert [p["rate"] for p in json.loads((inter / mode / "sweep.json").read_text())["points"]] == [100.0, 200.0]
        for rate in ("100", "200"):  # one server per point, started and stopped
            log = (inter / mode / f"server_rate_{rate}.log").read_text()
            assert log.count("ready: http://127.0.0.1:") == 1 and "stopped" in log
            # the point's requests are the same as in the mode-by-mode order (its seed is the rate's index)
            lens = [json.loads((d / mode / f"rate_{rate}.json").read_text())["input_lens"]
                    for d in (inter, tmp_path / "by-mode")]
            assert lens[0] == lens[1]
    assert "Modes ran interleaved, rate by rate" in (inter / "report.md").read_text()


def _summary(goodputs: dict[str, float], grids: dict[str, list[list[float]]]) -> dict:
    return {
        "reference_mode": "unified",
        "modes": {n: {"goodput": g} for n, g in goodputs.items()},
        "slo_map": {"goodput": grids},
    }


def test_verdict_wording() -> None:
    grid = lambda v: [[v, v], [v, v]]
    win = verdict(_summary({"unified": 1.0, "disagg": 2.0}, {"unified": grid(1.0), "disagg": [[2.0, 1.0], [0.5, 1.0]]}))
    assert win.startswith("disagg wins: 2 req/s goodput against 1 for unified (2.00x).")
    assert "more goodput in 1, less in 1, the same in 2" in win
    assert verdict(_summary({"unified": 2.0, "disagg": 1.0}, {"unified": grid(2), "disagg": grid(1)})).startswith(
        "unified wins: 2 req/s goodput against 1 for disagg (2.00x)."
    )
    assert verdict(_summary({"unified": 2.0, "disagg": 2.1}, {"unified": grid(2), "disagg": grid(2)})).startswith(
        "unified and disagg tie"
    )
    assert verdict(_summary({"unified": 0.0, "disagg": 0.0}, {"unified": grid(0), "disagg": grid(0)})).startswith(
        "Neither unified nor disagg"
    )
    saturated = {**_summary({"unified": 4.0, "disagg": 4.0}, {"unified": grid(4), "disagg": grid(4)}), "rates": [1, 4]}
    assert "Both held the SLO at the highest rate tried; add higher --rates" in verdict(saturated)


def test_compare_with_auto_records_placement_per_rate_and_checks_the_target(codec: TextCodec, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    launch = f"{PY} {shlex.quote(str(HERE / 'fake_server.py'))} --mode {{mode}} --host {{host}} --port {{port}}"
    args = ["compare", "--launch", launch, "--modes", "unified,disagg,auto", "--rates", "100,200",
            "--num-requests", "6", "--warmup", "1", "--isolated-per-bucket", "1", "--out", str(out)]
    result = CliRunner().invoke(bench, args, obj=BenchContext(load_codec=lambda path: codec))
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "compare.json").read_text())
    assert summary["modes"]["unified"]["placement"] == [] and summary["modes"]["disagg"]["placement"] == []
    placement = summary["modes"]["auto"]["placement"]
    assert [p["rate"] for p in placement] == [100.0, 200.0]
    for p in placement:  # each point counts only its own 6 requests (the warm-up falls in the first)
        assert sum(p["decisions"].values()) == (7 if p["rate"] == 100.0 else 6)
        assert set(p["decisions"]) <= {"local:idle", "disagg:stall"}
    # the fake switches a role every 4th request: 7 requests by the first point's end, 13 by the second's
    assert [p["role_switches"] for p in placement] == [1, 2]
    assert [(p["decodes_moved"], p["decode_moves_failed"]) for p in placement] == [(3, 1), (3, 2)]
    report = (out / "report.md").read_text()
    assert "## Adaptive placement" in report and "| auto | 100 |" in report
    assert "| 3 (1 failed) |" in report and "| 3 (2 failed) |" in report  # a failed move is not hidden
    assert "Adaptive target: auto goodput" in summary["verdict"] and "peak request goodput" in summary["verdict"]


def test_adaptive_target_wording() -> None:
    def mode(goodput: float, peak: float) -> dict:
        return {"goodput": goodput, "sweep": [{"request_goodput": peak / 2}, {"request_goodput": peak}]}

    summary = {"modes": {"unified": mode(0.3, 0.25), "disagg": mode(0.45, 0.4), "auto": mode(0.45, 0.39)}}
    text = adaptive_check(summary)
    assert "goodput 0.45 vs 0.45 for disagg (1.00x: within 0.95x)" in text
    assert "peak request goodput 0.39 vs 0.4 for disagg (0.97x: within 0.95x)" in text
    summary["modes"]["auto"] = mode(0.6, 0.5)
    assert "better than both" in adaptive_check(summary)
    summary["modes"]["auto"] = mode(0.3, 0.2)
    assert "(0.67x: below 0.95x)" in adaptive_check(summary)
    assert adaptive_check({"modes": {"unified": mode(1, 1), "disagg": mode(1, 1)}}) == ""


def test_parse_decisions_and_per_point_delta() -> None:
    text = ('pdbox_auto_decisions_total{decision="local",reason="idle",role="router",worker="router"} 3\n'
            'pdbox_auto_decisions_total{decision="disagg",reason="free",role="router",worker="router"} 5\n'
            'pdbox_auto_decisions_total{decision="local",reason="idle",role="decode",worker="e1"} 99\n')
    assert parse_decisions(text) == {"local:idle": 3.0, "disagg:free": 5.0}
    first = {"decisions": {"local:idle": 3.0}, "role_switches": 1, "leanings": {}}
    second = {"decisions": {"local:idle": 4.0, "disagg:free": 5.0}, "role_switches": 1, "leanings": {}}
    assert delta(first, None)["decisions"] == {"local:idle": 3.0}
    d = delta(second, first)
    assert d["decisions"] == {"local:idle": 1.0, "disagg:free": 5.0} and d["role_switches"] == 0
    assert delta(None, first) is None

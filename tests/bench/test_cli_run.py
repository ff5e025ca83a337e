"""End to end: `bench run` and `bench sweep` against the fake streaming server on an OS-assigned port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bench.cli import BenchContext, bench
from bench.workloads import TextCodec
from tests.bench.conftest import ThreadServer
from tests.bench.fake_server import BODIES, MODEL_ID

VLLM_KEYS = {
    "completed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_goodput",
    "duration",
    "ttfts",
    "itls",
    "input_lens",
    "output_lens",
    "errors",
} | {f"{s}_{m}_ms" for s in ("mean", "median", "p99", "std") for m in ("ttft", "tpot", "itl", "e2el")}


def invoke(codec: TextCodec, args: list[str]) -> Result:
    result = CliRunner().invoke(bench, args, obj=BenchContext(load_codec=lambda path: codec))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_run_writes_a_vllm_compatible_result(fake_server: ThreadServer, codec: TextCodec, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cli = invoke(
        codec,
        [
            "run",
            "--url",
            fake_server.url,
            "--workload",
            "chat",
            "--rate",
            "200",
            "--num-requests",
            "12",
            "--seed",
            "5",
            "--warmup",
            "1",
            "--out",
            str(out),
        ],
    )
    result = json.loads((out / "result.json").read_text())
    assert VLLM_KEYS <= set(result)
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["model_id"] == MODEL_ID  # taken from GET /v1/models
    assert result["backend"] == "openai-chat" and result["request_rate"] == 200.0
    for key in ("ttfts", "itls", "input_lens", "output_lens", "errors", "latencies"):
        assert len(result[key]) == 12, key
    assert result["errors"] == [""] * 12
    assert all(64 <= n <= 256 for n in result["input_lens"])
    assert result["output_lens"] == result["requested_output_lens"]
    assert all(100 <= n <= 300 for n in result["output_lens"])
    assert result["total_output_tokens"] == sum(result["output_lens"])
    assert [len(i) for i in result["itls"]] == [n - 1 for n in result["output_lens"]]
    assert result["request_goodput"] is None and result["slo"] is None
    bodies = fake_server.app[BODIES]
    assert len(bodies) == 13  # one warm-up + twelve measured
    assert sorted(b["max_completion_tokens"] for b in bodies[1:]) == sorted(result["output_lens"])
    assert "Successful requests" in cli.output and "Mean TTFT (ms)" in cli.output


def test_run_closed_loop_with_slos_and_completions(fake_server: ThreadServer, codec: TextCodec, tmp_path: Path) -> None:
    common = [
        "run",
        "--url",
        fake_server.url,
        "--model",
        "named",
        "--endpoint",
        "completions",
        "--workload",
        "rag",
        "--concurrency",
        "3",
        "--num-requests",
        "6",
        "--warmup",
        "0",
    ]
    invoke(codec, [*common, "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out", str(tmp_path / "a")])
    invoke(codec, [*common, "--slo-ttft-ms", "0.001", "--out", str(tmp_path / "b")])
    loose = json.loads((tmp_path / "a" / "result.json").read_text())
    tight = json.loads((tmp_path / "b" / "result.json").read_text())
    assert loose["model_id"] == "named" and loose["backend"] == "openai"
    assert loose["request_rate"] == "inf" and loose["max_concurrency"] == 3
    assert loose["slo_attainment"] == 1.0
    assert loose["request_goodput"] == pytest.approx(6 / loose["duration"])
    assert tight["slo_attainment"] == 0.0 and tight["request_goodput"] == 0.0
    assert tight["slo"] == {"kind": "absolute", "ttft_ms": 0.001, "tpot_ms": None}
    assert all("prompt" in b for b in fake_server.app[BODIES])
    assert all(1024 <= n <= 2048 for n in loose["input_lens"])


def test_failed_requests_are_counted_and_explained(fake_server: ThreadServer, codec: TextCodec, tmp_path: Path) -> None:
    conversations = [
        {
            "conversations": [
                {"from": "human", "value": f"tell me about topic {i} " + ("FAIL-ME " if i == 2 else "")},
                {"from": "gpt", "value": "it is a topic worth a few words"},
            ]
        }
        for i in range(4)
    ]
    dataset = tmp_path / "sg.json"
    dataset.write_text(json.dumps(conversations))
    invoke(
        codec,
        [
            "run",
            "--url",
            fake_server.url,
            "--dataset",
            str(dataset),
            "--num-requests",
            "4",
            "--concurrency",
            "2",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / "r"),
        ],
    )
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["workload"] == "sharegpt:sg.json"
    assert (result["completed"], result["failed"]) == (3, 1)
    assert sum(e.startswith("HTTP 500") for e in result["errors"]) == 1
    assert sorted(result["output_lens"])[0] == 0


def test_run_needs_a_rate_or_a_concurrency(fake_server: ThreadServer, codec: TextCodec, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        bench,
        ["run", "--url", fake_server.url, "--out", str(tmp_path)],
        obj=BenchContext(load_codec=lambda path: codec),
    )
    assert result.exit_code == 2 and "--rate R" in result.output


def test_unreachable_server_is_a_clean_error(codec: TextCodec, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = CliRunner().invoke(
        bench,
        ["run", "--url", url, "--rate", "1", "--out", str(tmp_path)],
        obj=BenchContext(load_codec=lambda path: codec),
    )
    assert result.exit_code == 1 and "cannot reach" in result.output


def test_sweep_measures_a_baseline_and_reports_goodput(
    fake_server: ThreadServer, codec: TextCodec, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--url",
        fake_server.url,
        "--rates",
        "400,200",
        "--workload",
        "mixed",
        "--num-requests",
        "6",
        "--warmup",
        "1",
        "--isolated-per-bucket",
        "1",
        "--out",
        str(out),
    ]
    invoke(codec, args)
    summary = json.loads((out / "sweep.json").read_text())
    isolated = json.loads((out / "isolated.json").read_text())
    assert [p["rate"] for p in summary["points"]] == [200.0, 400.0]
    assert summary["goodput"] in (0.0, 200.0, 400.0)
    assert summary["slo"]["kind"] == "relative" and summary["slo"]["k_ttft"] == 4.0
    assert summary["attainment_target"] == 0.9
    assert isolated["completed"] >= 2 and isolated["baseline"]["tpot_ms"] > 0
    assert len(isolated["baseline"]["ttft_s_by_bucket"]) >= 2  # the chat and rag buckets of `mixed`
    for rate in ("200", "400"):
        point = json.loads((out / f"rate_{rate}.json").read_text())
        assert VLLM_KEYS <= set(point) and point["completed"] == 6
    a, b = (json.loads((out / f"rate_{r}.json").read_text()) for r in ("200", "400"))
    assert a["seed"] != b["seed"] and a["input_lens"] != b["input_lens"]  # fresh prompts per point


def test_zero_slo_is_rejected_not_ignored(fake_server: ThreadServer, codec: TextCodec, tmp_path: Path) -> None:
    args = ["run", "--url", fake_server.url, "--rate", "1", "--slo-tpot-ms", "0", "--out", str(tmp_path)]
    result = CliRunner().invoke(bench, args, obj=BenchContext(load_codec=lambda path: codec))
    assert result.exit_code == 2 and "must be positive" in result.output


def test_python_dash_m_bench_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, check=True).stdout
    assert "Usage: python -m bench" in out
    assert all(cmd in out for cmd in ("run", "sweep", "compare", "report"))

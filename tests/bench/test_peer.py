"""`bench peer`: two fake OpenAI servers, one as the peer and one as pdbox, at a tiny --scale."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bench.cli import BenchContext, bench
from bench.peer_workloads import PEER_WORKLOADS, parse_workloads
from bench.workloads import TextCodec
from tests.bench.conftest import ThreadServer
from tests.bench.fake_server import BODIES, MODEL_ID, make_app

SCALE = 0.05


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    """Stand-in tokenizer with a known vocabulary whose decoded ids re-encode exactly: id i is "t{i} "."""
    return TextCodec(encode=lambda text: [int(w[1:]) for w in text.split()],
                     decode=lambda ids: "".join(f"t{i} " for i in ids), name="numbered-words", vocab_size=5000)


@pytest.fixture
def pair() -> Iterator[tuple[ThreadServer, ThreadServer]]:
    """A fast peer and a pdbox (`--mode auto`, per its /workers) eight times slower per token, so the winners
    are not a coin toss."""
    with ThreadServer(make_app(token_s=0.001)) as peer, ThreadServer(make_app(token_s=0.008, adaptive=True)) as pdbox:
        yield peer, pdbox


def invoke(codec: TextCodec, args: list[str]) -> Result:
    return CliRunner().invoke(bench, ["peer", *args], obj=BenchContext(load_codec=lambda path: codec))


def closed_port_url() -> str:
    with socket.socket() as s:  # nobody listens there once this socket closes
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_the_fixed_workloads_are_the_issues_table() -> None:
    shapes = {n: (w.prompt_len, w.output_len, w.num_requests, w.rate, w.max_concurrency)
              for n, w in PEER_WORKLOADS.items()}
    assert shapes == {"chat-burst": (256, 64, 48, math.inf, 48), "chat-1rps": (256, 64, 60, 1.0, None),
                      "chat-2rps": (256, 64, 60, 2.0, None), "rag-0.3rps": (1536, 32, 30, 0.3, None)}
    assert len({w.seed(0) for w in PEER_WORKLOADS.values()} | {w.seed(1) for w in PEER_WORKLOADS.values()}) == 8
    small = PEER_WORKLOADS["rag-0.3rps"].sized(0.1, None)
    assert (small.prompt_len, small.output_len, small.num_requests, small.rate) == (154, 32, 3, pytest.approx(3.0))
    assert PEER_WORKLOADS["chat-burst"].sized(1, 100).label == "chat 256 in / 64 out, 100 requests, 48 at a time"
    assert [w.name for w in parse_workloads("rag-0.3rps, chat-burst")] == ["chat-burst", "rag-0.3rps"]
    with pytest.raises(ValueError, match="choose from chat-burst"):
        parse_workloads("chat,nope")
    cmd = PEER_WORKLOADS["chat-burst"].vllm_command("http://h:1", "m", 0)
    for part in ("--backend openai-chat", "--dataset-name random", "--random-input-len 256", "--random-output-len 64",
                 "--random-range-ratio 0", "--ignore-eos", "--request-rate inf", "--max-concurrency 48", "--seed 1"):
        assert part in cmd


def test_peer_and_pdbox_side_by_side(pair: tuple[ThreadServer, ThreadServer], codec: TextCodec, tmp_path: Path) -> None:
    peer, pdbox = pair
    out = tmp_path / "out"
    cli = invoke(codec, ["--url", peer.url, "--pdbox-url", pdbox.url + "/v1", "--scale", str(SCALE),
                         "--warmup", "1", "--seed", "3", "--out", str(out)])
    assert cli.exit_code == 0, cli.output + repr(cli.exception)
    report = json.loads((out / "peer-report.json").read_text())
    md = (out / "peer-report.md").read_text()

    assert report["servers"]["peer"] == {"role": "peer", "name": "peer", "url": peer.url, "model": MODEL_ID,
                                         "owned_by": None, "mode": None}
    assert report["servers"]["pdbox"]["url"] == pdbox.url and report["servers"]["pdbox"]["mode"] == "auto"
    assert report["servers"]["pdbox"]["name"] == "pdbox auto"
    assert report["order"] == ["peer", "pdbox"] and report["scale"] == SCALE and report["seed"] == 3
    assert report["command"].startswith(f"pdbox bench peer --url {peer.url} --pdbox-url {pdbox.url}/v1")
    assert "--scale 0.05" in report["command"] and report["date"].endswith("UTC")
    assert [w["name"] for w in report["workloads"]] == list(PEER_WORKLOADS)
    assert [w["seed"] for w in report["workloads"]] == [301, 302, 303, 304]
    assert [w["num_requests"] for w in report["workloads"]] == [2, 3, 3, 2]
    assert [w["prompt_len"] for w in report["workloads"]] == [13, 13, 13, 77]
    assert all(w["vllm_command"].startswith("vllm bench serve --backend openai-chat") for w in report["workloads"])

    rows = [(r["workload"], r["metric"]) for r in report["rows"]]
    assert rows == [("chat-burst", "output_throughput"), ("chat-1rps", "median_ttft_ms"),
                    ("chat-1rps", "median_tpot_ms"), ("chat-2rps", "median_ttft_ms"), ("chat-2rps", "median_tpot_ms"),
                    ("rag-0.3rps", "median_ttft_ms"), ("rag-0.3rps", "p99_ttft_ms"), ("rag-0.3rps", "median_tpot_ms")]
    for r in report["rows"]:
        assert r["peer"] > 0 and r["pdbox"] > 0 and r["ratio"] == pytest.approx(r["pdbox"] / r["peer"])
        assert r["winner"] in ("peer", "pdbox auto") and r["failed"] == {"peer": 0, "pdbox": 0}
    by_key = {(r["workload"], r["metric"]): r for r in report["rows"]}
    assert by_key["chat-burst", "output_throughput"]["ratio"] < 1  # pdbox streams 8x slower here
    assert by_key["chat-burst", "output_throughput"]["winner"] == "peer"
    tpot = by_key["chat-1rps", "median_tpot_ms"]
    assert tpot["ratio"] > 1 and tpot["winner"] == "peer"  # lower is better for latencies

    assert all(run["completed"] > 0 and run["failed"] == 0 and not run["errors"] for run in report["runs"])
    for role in ("peer", "pdbox"):
        burst = json.loads((out / "results" / f"{role}-chat-burst.json").read_text())
        assert burst["max_concurrency"] == 48 and burst["request_rate"] == "inf" and burst["completed"] == 2
        assert burst["output_lens"] == [64, 64] and burst["input_lens"] == [13, 13]
        assert burst["server_input_lens"] == [13, 13]  # the fake server counts words: the prompts are exact

    sent = {name: [b for b in server.app[BODIES]] for name, server in (("peer", peer), ("pdbox", pdbox))}
    assert len(sent["peer"]) == 1 + 2 + 3 + 3 + 2
    prompts = {name: [b["messages"][0]["content"] for b in bodies] for name, bodies in sent.items()}
    assert prompts["peer"] == prompts["pdbox"]  # the same prompts, in the same order
    assert len(set(prompts["peer"])) == len(prompts["peer"])  # no prompt repeats across workloads
    for body in sent["pdbox"][1:]:
        assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0
        assert body["stream_options"] == {"include_usage": True} and body["model"] == MODEL_ID
        assert body["max_completion_tokens"] in (64, 32) and "max_tokens" not in body

    assert "| workload | metric | peer | pdbox auto | pdbox auto/peer | better |" in md
    assert f"at {peer.url}" in md and report["command"] in md and report["date"] in md
    ratio = by_key["chat-burst", "output_throughput"]["ratio"]
    assert f"| {ratio:.2f}x | peer |" in md and "vllm bench serve" in md and "smoke test" in md
    assert "pdbox auto beside peer" in cli.output


def test_a_tokenizer_without_a_vocabulary_size_is_refused(fake_server: ThreadServer, tmp_path: Path) -> None:
    vague = TextCodec(encode=str.split, decode=" ".join, name="vague")  # type: ignore[arg-type]
    result = CliRunner().invoke(bench, ["peer", "--url", fake_server.url, "--pdbox-url", closed_port_url(),
                                        "--out", str(tmp_path)], obj=BenchContext(load_codec=lambda path: vague))
    assert result.exit_code == 2 and "vocabulary size" in result.output


@pytest.mark.parametrize("role", ["peer", "pdbox"])
def test_an_unreachable_url_is_named(role: str, fake_server: ThreadServer, codec: TextCodec, tmp_path: Path) -> None:
    dead = closed_port_url()
    urls = {"peer": dead, "pdbox": fake_server.url} if role == "peer" else {"peer": fake_server.url, "pdbox": dead}
    result = invoke(codec, ["--url", urls["peer"], "--pdbox-url", urls["pdbox"], "--scale", str(SCALE),
                            "--probe-timeout-s", "5", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert f"cannot reach the {role} server at {dead}" in result.output
    assert ("pdbox up" in result.output) == (role == "pdbox")
    assert fake_server.app[BODIES] == []  # nothing ran against the live one
    assert not (tmp_path / "peer-report.json").exists()


def test_pdbox_url_is_asked_for(fake_server: ThreadServer, codec: TextCodec, tmp_path: Path) -> None:
    result = invoke(codec, ["--url", fake_server.url, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--pdbox-url is needed" in result.output and "pdbox up" in result.output
    same = invoke(codec, ["--url", fake_server.url, "--pdbox-url", fake_server.url + "/", "--out", str(tmp_path)])
    assert same.exit_code == 2 and "must differ" in same.output


def test_no_winner_when_requests_failed() -> None:
    """A side that lost requests measured fewer, easier ones: the report names the failures instead."""
    from bench.peer_report import _no_winner

    names = {"peer": "vllm", "pdbox": "pdbox auto"}
    assert _no_winner({"failed": {"peer": 0, "pdbox": 13}}, names) == "none: pdbox auto failed 13"
    assert _no_winner({"failed": {"peer": 2, "pdbox": 1}}, names) == "none: vllm failed 2, pdbox auto failed 1"
    assert _no_winner({"failed": {"peer": 0, "pdbox": 0}}, names) == "-"

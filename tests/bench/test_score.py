"""bench.score: one `pdbox up` scored against itself (as its own peer) through the real HTTP path: the
logprobs agree exactly, the likeliest alternatives always, and the report says so; bad options are named."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.score import main, windows
from tests.serve.appliance_proc import running_appliance

pytestmark = pytest.mark.slow


def test_pdbox_against_itself_agrees_exactly(tmp_path) -> None:
    out = tmp_path / "score.json"
    with running_appliance("--mode", "unified", "--cpus", "0") as url:
        result = CliRunner().invoke(main, ["--url", url, "--peer-url", url + "/v1", "--texts", "3", "--tokens", "24",
                                           "--batch", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["texts"] == 3 and report["scored_tokens"] == 3 * 23
    assert report["max_abs_diff"] == 0.0 and report["top1_agreement"] == 1.0
    assert report["perplexity"] == report["peer_perplexity"] > 1.0
    assert "agrees 100.0%" in result.output


def test_windows_and_bad_options() -> None:
    assert windows(list(range(10)), 4, 5) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    result = CliRunner().invoke(main, ["--url", "http://x", "--peer-url", "http://y", "--tokens", "1"])
    assert result.exit_code != 0 and "--tokens >= 2" in result.output

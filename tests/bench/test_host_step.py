"""bench.host_step: the engine's host time per decode step, the model's forward stubbed out."""

from __future__ import annotations

import json

import pytest

from bench.host_step import host_step_ms, main


def test_every_batch_size_decodes_in_full_and_gets_a_time() -> None:
    got = host_step_ms((1, 8), context=20, steps=3)
    assert got["context"] == 20 and got["steps"] == 3
    for b in (1, 8):
        assert got[f"host_ms_b{b}"] > 0
        assert got[f"host_us_per_request_b{b}"] == pytest.approx(1000 * got[f"host_ms_b{b}"] / b, rel=0.01)


def test_json_and_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--batches", "2", "--context", "8", "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["host_ms_b2"] > 0
    assert main(["--batches", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert main(["--context", "4000"]) == 2
    assert "must fit random:tiny's 1024 positions, got 4056" in capsys.readouterr().err

"""The transfer bench runs end to end on tiny shapes and reports the documented JSON keys."""

from __future__ import annotations

import json

import pytest

from bench import transfer

pytestmark = pytest.mark.timeout(120)


def test_json_mode_reports_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--backend", "shm", "--pages", "4", "--json", "--layers", "2", "--head-dim", "8", "--repeats", "2"]
    assert transfer.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("backend", "bytes", "gbps", "baseline_gbps", "ratio"):
        assert key in result
    assert result["backend"] == "shm" and result["verified"] and result["bytes"] == 2 * 2 * 4 * 16 * 3 * 8 * 2


def test_scattered_tcp_is_verified() -> None:
    r = transfer.measure("tcp", 5, shape=transfer.Shape(layers=2, head_dim=8), layout="scattered", repeats=1)
    assert r.verified and r.gbps > 0 and r.baseline_gbps > 0

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
    assert result["copy_path"] == "torch"


def test_the_copy_path_is_chosen_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    import os

    assert transfer.main(["--backend", "shm", "--copy", "put", "--pages", "4"]) == 2
    assert "'put' is no copy path of shm (the paths: shm torch|kernel" in capsys.readouterr().err

    shape = transfer.Shape(layers=2, head_dim=8)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the page-copy kernel, interpreted on CPU shared memory
        r = transfer.measure("shm", 5, shape=shape, layout="scattered", repeats=1, copy="kernel")
        assert r.verified and r.copy_path == "kernel"
    with pytest.raises(ValueError, match=r"shm's copy path is one of \('torch', 'kernel'\), got 'put'"):
        transfer.measure("shm", 5, shape=shape, repeats=1, copy="put")
    with pytest.raises(ValueError, match="tcp's copy path"):
        transfer.measure("tcp", 5, shape=shape, repeats=1, copy="kernel")


def test_scattered_tcp_is_verified() -> None:
    r = transfer.measure("tcp", 5, shape=transfer.Shape(layers=2, head_dim=8), layout="scattered", repeats=1)
    assert r.verified and r.gbps > 0 and r.baseline_gbps > 0


def test_table_mode_writes_each_figure_as_it_comes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check measures two sizes in one run: the second failing must not lose the first."""
    real, calls = transfer.measure, []

    def measure(backend: str, pages: int, **kw):
        calls.append(pages)
        if len(calls) == 2:
            raise RuntimeError("the second size fails")
        return real(backend, pages, **kw)

    monkeypatch.setattr(transfer, "measure", measure)
    out = tmp_path / "t.json"
    args = ["--backend", "shm", "--pages", "4", "--pages", "8", "--layout", "contiguous", "--layers", "2",
            "--head-dim", "8", "--repeats", "1", "--out", str(out)]
    with pytest.raises(RuntimeError, match="second size"):
        transfer.main(args)
    assert calls == [4, 8]
    assert [r["pages"] for r in json.loads(out.read_text())] == [4]


def test_a_failure_stops_the_decode_rank_and_is_said_before_the_close(monkeypatch, capfd) -> None:
    """The decode rank leaves its command loop on the way out (with nvshmem its close is collective: a rank
    left waiting for a command held the bench's close until the step's timeout killed it, and the error
    with it), and the error is printed before the close."""
    import time

    def broken(_t):
        raise RuntimeError("the digest broke")

    monkeypatch.setattr(transfer, "_digest", broken)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="the digest broke"):
        transfer.measure("shm", 4, shape=transfer.Shape(layers=2, head_dim=8), repeats=1)
    assert time.monotonic() - t0 < 30  # not the 60 s the bench waits for a decode rank before killing it
    err = capfd.readouterr().err
    assert "bench.transfer failed; closing the transport" in err and "the digest broke" in err

"""bench.cpu_attention: pdbox's C attention kernels timed beside the CPU backend's torch paths."""

from __future__ import annotations

import pytest

from bench.cpu_attention import main, run
from kernels.cpu.flash_extend import native

BUILT = native()


@pytest.mark.skipif(BUILT.lib is None, reason=f"no C attention kernels here: {BUILT.reason}")
def test_every_shape_gets_both_timings() -> None:
    got = run(threads=1, cold=True, prefill_shapes=((0, 40), (70, 33)), decode_shapes=((2, 50),))
    assert [(p["prefix"], p["new"]) for p in got["prefill"]] == [(0, 40), (70, 33)]
    assert all(p["c_ms"] > 0 and p["torch_ms"] > 0 and p["c_g_scores_s"] > 0 for p in got["prefill"])
    (d,) = got["decode"]
    assert (d["batch"], d["context"]) == (2, 50) and d["c_us"] > 0 and d["torch_us"] > 0 and got["cold"]


def test_zero_threads_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err

"""bench.cpu_attention: pdbox's C attention kernels timed beside the CPU backend's torch paths."""

from __future__ import annotations

import pytest

from bench.cpu_attention import main, run
from kernels.cpu.flash_extend import native, native_f32

BUILT = {"bfloat16": native(), "float32": native_f32()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_shape_gets_both_timings(dtype: str) -> None:
    if BUILT[dtype].lib is None:
        pytest.skip(f"no {dtype} C attention kernels here: {BUILT[dtype].reason}")
    got = run(threads=1, cold=True, prefill_shapes=((0, 40), (70, 33)), decode_shapes=((2, 50),), dtype=dtype)
    assert got["dtype"] == dtype
    assert [(p["prefix"], p["new"]) for p in got["prefill"]] == [(0, 40), (70, 33)]
    assert all(p["c_ms"] > 0 and p["torch_ms"] > 0 and p["c_g_scores_s"] > 0 for p in got["prefill"])
    (d,) = got["decode"]
    assert (d["batch"], d["context"]) == (2, 50) and d["c_us"] > 0 and d["torch_us"] > 0 and got["cold"]


def test_zero_threads_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_a_bad_dtype_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dtype", "float16"]) == 2
    assert "--dtype" in capsys.readouterr().err

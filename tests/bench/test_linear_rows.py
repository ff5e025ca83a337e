"""bench.linear_rows: the linear layers of a step timed by row count, engine path beside raw oneDNN."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.engine.attention_cpu import int4_available, onednn_available
from bench.linear_rows import main, run
from kernels.cpu.quant_gemv import native as native_quant


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
def test_each_row_count_gets_both_timings(tiny_model: Path) -> None:
    got = run(str(tiny_model), threads=1, dtype="float32", rows=[1, 3])
    assert [r["rows"] for r in got] == [1, 3]
    assert all(r["engine_ms"] > 0 and r["unpadded_ms"] > 0 for r in got)
    assert all(r["q4_ms"] is None and r["q4_kernel"] is None for r in got)  # a float checkpoint has no 4-bit weights


@pytest.mark.skipif(not onednn_available() or not int4_available(), reason="no oneDNN packing or no int4 kernel")
@pytest.mark.parametrize("native", [True, False])
def test_a_q4_gguf_also_gets_its_4_bit_timing(smollm_path: Path, native: bool) -> None:
    (got,) = run(str(smollm_path), threads=1, dtype="auto", rows=[1], native_kernels=native)  # fp32 or bf16
    assert got["q4_ms"] > 0 and got["engine_ms"] > 0
    assert got["q4_kernel"] == ("pdbox-quant" if native and native_quant().lib is not None else "torch-int4")


def test_a_bad_row_list_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rows", "one"]) == 2
    assert "--rows" in capsys.readouterr().err

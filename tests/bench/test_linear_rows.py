"""bench.linear_rows: the linear layers of a step timed by row count, engine path beside raw oneDNN."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.engine.attention_cpu import int4_available, onednn_available
from bench.linear_rows import main, run


@pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")
def test_each_row_count_gets_both_timings(tiny_model: Path) -> None:
    got = run(str(tiny_model), threads=1, dtype="float32", rows=[1, 3])
    assert [r["rows"] for r in got] == [1, 3]
    assert all(r["engine_ms"] > 0 and r["unpadded_ms"] > 0 for r in got)
    assert all(r["int4_ms"] is None for r in got)  # a float checkpoint has no int4 weights


@pytest.mark.skipif(not onednn_available() or not int4_available(), reason="no oneDNN packing or no int4 kernel")
def test_a_q4_gguf_also_gets_the_int4_timing(smollm_path: Path) -> None:
    (got,) = run(str(smollm_path), threads=1, dtype="auto", rows=[1])  # fp32 or bf16, whichever runs here
    assert got["int4_ms"] > 0 and got["engine_ms"] > 0


def test_a_bad_row_list_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rows", "one"]) == 2
    assert "--rows" in capsys.readouterr().err

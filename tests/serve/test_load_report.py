"""The typed /load report: one decoder for the worker's body and the router's /workers listing."""

from __future__ import annotations

import msgspec
import pytest

from appliance.serve.load_report import NO_REPORT, LoadReport, decode_load, listed
from appliance.serve.policies import WorkerHandle


def test_a_report_round_trips_from_bytes_and_from_its_listing() -> None:
    report = LoadReport(name="decode-0", role="decode", pid=7, running=2, total_pages=100, free_pages=40,
                        evictable_pages=10, prefill_tok_s=512.0, decode_step_s=0.02, transport="shm")
    body = msgspec.json.encode(report)
    assert decode_load(body) == report
    assert decode_load(listed(report)) == report  # the monitor reads /workers' copy the same way
    assert decode_load(b'{"running": 1, "handle": "an older worker\'s field"}').running == 1


def test_a_bad_report_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="running"):
        decode_load(b'{"running": "many"}')
    with pytest.raises(ValueError, match="not a /load report"):
        decode_load(b"<html>")


def test_before_its_first_report_a_worker_reads_idle_and_empty() -> None:
    w = WorkerHandle(name="w", role="decode", url="http://w")
    assert w.load is NO_REPORT and listed(w.load) == {}
    assert w.pressure == 0.0 and w.kv_free == 1.0
    w.load = LoadReport(total_pages=100, free_pages=40, evictable_pages=10, waiting=3)
    assert w.pressure == pytest.approx(3 + 0.5) and w.kv_free == pytest.approx(0.5)

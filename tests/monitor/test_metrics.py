"""Metrics plumbing without processes: registry text, parser, merge, histogram quantiles, windows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from appliance.monitor.prom import Histogram, Metrics, parse
from appliance.monitor.snapshot import Monitor, Snapshot
from appliance.serve.metrics import Registry
from appliance.serve.metrics_merge import merge_prometheus
from appliance.serve.worker_metrics import RateWindow, WorkerMetrics


def test_registry_text_parses_back_with_labels_and_escapes() -> None:
    reg = Registry(role="decode", worker="decode-0")
    reg.counter("pdbox_errors_total", "Errors", ("kind",)).inc(2, kind='say "hi"\\n')
    reg.gauge("pdbox_kv_pages_used", "Used").set(7)
    h = reg.histogram("pdbox_ttft_seconds", "TTFT", (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    m = Metrics.from_text(reg.render())
    (err,) = m.series("pdbox_errors_total")
    assert err.labels == {"kind": 'say "hi"\\n', "role": "decode", "worker": "decode-0"} and err.value == 2
    assert m.value("pdbox_kv_pages_used", worker="decode-0") == 7
    hist = m.histogram("pdbox_ttft_seconds")
    assert hist.buckets == ((0.1, 2.0), (1.0, 3.0), (math.inf, 4.0)) and hist.count == 4
    assert hist.total == pytest.approx(3.65)
    with pytest.raises(ValueError, match="is a counter"):
        reg.gauge("pdbox_errors_total", "again")
    with pytest.raises(ValueError, match="labels"):
        reg.counter("pdbox_errors_total", "Errors", ("reason",))
    assert "_created" not in reg.render()  # prometheus_client's extra series stay out of the exposition


def test_total_mirrors_a_count_kept_elsewhere() -> None:
    reg = Registry(role="decode", worker="decode-0")
    t = reg.total("pdbox_transfer_bytes_total", "Bytes", ("direction",))
    t.set_total(10, direction="sent")
    t.set_total(7, direction="sent")
    assert t.get(direction="sent") == 7
    assert Metrics.from_text(reg.render()).value("pdbox_transfer_bytes_total", direction="sent") == 7
    with pytest.raises(ValueError, match="labels"):
        t.set_total(1)


def test_parser_refuses_garbage_with_the_line() -> None:
    assert parse("# HELP x y\n\nx 1\nx{a=\"b\"} 2.5 1700000000\n")[1].value == 2.5
    with pytest.raises(ValueError, match="oops"):
        parse("x 1\n<html>oops</html>\n")


def test_quantile_interpolates_like_promql() -> None:
    h = Histogram(((0.05, 3.0), (0.1, 8.0), (0.25, 11.0), (math.inf, 11.0)), 11.0, 0.9)
    assert h.quantile(0.5) == pytest.approx(0.05 + 0.05 * (5.5 - 3) / 5)
    assert h.quantile(0.99) == pytest.approx(0.1 + 0.15 * (10.89 - 8) / 3)
    assert Histogram(((1.0, 0.0), (math.inf, 2.0)), 2.0, 9.0).quantile(0.5) == 1.0  # in +Inf: the top bound
    assert math.isnan(Histogram((), 0.0, 0.0).quantile(0.5))
    older = Histogram(((0.05, 3.0), (0.1, 3.0), (0.25, 3.0), (math.inf, 3.0)), 3.0, 0.1)
    recent = h.minus(older)
    assert recent.count == 8 and recent.quantile(0.5) == pytest.approx(0.05 + 0.05 * 4 / 5)
    assert h.minus(Histogram(((1.0, 50.0), (math.inf, 50.0)), 50.0, 9.0)) is h  # a reset: count from zero


def test_merge_keeps_one_header_per_family() -> None:
    a = Registry(role="router", worker="router")
    a.histogram("pdbox_ttft_seconds", "TTFT", (1.0,)).observe(0.5)
    b = Registry(role="prefill", worker="prefill-0")
    b.histogram("pdbox_ttft_seconds", "TTFT engine", (0.5,)).observe(0.2)
    b.gauge("pdbox_kv_pages_used", "Used").set(3)
    text = merge_prometheus([a.render(), "", b.render()])
    assert text.count("# TYPE pdbox_ttft_seconds histogram") == 1
    lines = text.splitlines()
    first_gauge = lines.index("# HELP pdbox_kv_pages_used Used")
    assert all("ttft" not in ln for ln in lines[first_gauge:])  # families stay contiguous
    m = Metrics.from_text(text)
    assert m.histogram("pdbox_ttft_seconds", role="router").count == 1
    assert m.histogram("pdbox_ttft_seconds", worker="prefill-0").count == 1


def test_rate_window() -> None:
    w = RateWindow(span_s=10.0)
    w.add(100.0, tokens=50)
    w.add(104.0, tokens=50)
    assert w.rate(105.0, "tokens") == pytest.approx(100 / 5)
    assert w.rate(105.0, "other") == 0.0
    assert w.rate(200.0, "tokens") == 0.0


def _scrape(at: float, ok: float, errors: float, tokens: float, ttft: list[float]) -> Snapshot:
    router = Registry(role="router", worker="router")
    requests = router.counter("pdbox_requests_total", "r", ("endpoint", "outcome"))
    requests.inc(ok, endpoint="chat", outcome="ok")
    requests.inc(errors, endpoint="chat", outcome="error")
    router.counter("pdbox_errors_total", "e", ("kind",)).inc(errors, kind="502")
    router.gauge("pdbox_uptime_seconds", "u").set(at)
    h = router.histogram("pdbox_ttft_seconds", "t", (0.1, 1.0))
    for v in ttft:
        h.observe(v)
    worker = Registry(role="decode", worker="decode-0")
    worker.gauge("pdbox_kv_pages_total", "t").set(100)
    worker.counter("pdbox_decode_tokens_total", "d").inc(tokens)
    workers = {"mode": "disagg", "model": "m", "workers": [{"name": "decode-0", "role": "decode", "healthy": True}]}
    return Snapshot.parse(merge_prometheus([router.render(), worker.render()]), workers, at=at)


def test_monitor_rates_and_percentiles_come_from_the_recent_window() -> None:
    mon = Monitor("http://x")
    first = mon.update(_scrape(10.0, ok=10, errors=0, tokens=1000, ttft=[0.05] * 10))
    assert first.window_s is None and first.req_s == pytest.approx(1.0)  # since start: 10 requests in 10 s
    assert first.latency[0].p50 < 0.1
    later = mon.update(_scrape(12.0, ok=13, errors=1, tokens=1100, ttft=[0.05] * 10 + [0.5] * 4))
    assert later.window_s == pytest.approx(2.0)
    assert later.req_s == pytest.approx(2.0) and later.error_rate == pytest.approx(0.25)
    assert later.workers[0].tok_s == pytest.approx(50.0)
    assert 0.1 < later.latency[0].p50 < 1.0  # only the 4 recent (slow) first tokens count
    assert later.errors == {"502": 1.0}
    assert [v for _, v in later.spark["req_s"]] == [pytest.approx(1.0), pytest.approx(2.0)]
    stale = mon.failed("cannot reach the router")
    assert stale is not None and stale.problem and stale.req_s == later.req_s


def _fake_worker() -> SimpleNamespace:
    sched = SimpleNamespace(schedule=lambda: None, running=[], waiting=[], num_preemptions=0)
    engine = SimpleNamespace(scheduler=sched, requests={})
    return SimpleNamespace(cfg=SimpleNamespace(role="unified", name="unified-0"), engine=engine, transport=None)


def test_worker_metrics_follow_requests_through_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _fake_worker()
    wm = WorkerMetrics(worker)
    clock = iter([10.5, 10.6, 10.8])
    monkeypatch.setattr("appliance.serve.worker_metrics.time.monotonic", lambda: next(clock))
    req = SimpleNamespace(request_id="r1", arrival=10.0, output_ids=[], is_finished=False, finish_reason=None)
    batches = []

    def step(n_out: int, finished: bool = False) -> None:
        req.output_ids = [1] * n_out
        req.is_finished, req.finish_reason = finished, "length" if finished else None
        batches.append(SimpleNamespace(requests=[req], sample=[True]))
        wm._batch = batches[-1]  # what the wrapped scheduler.schedule would have kept
        wm.on_step(0.01, 5 if n_out == 1 else 0, 0 if n_out == 1 else 1)

    step(1)
    step(2)
    step(3, finished=True)
    m = Metrics.from_text(wm.reg.render())
    assert m.histogram("pdbox_ttft_seconds").total == pytest.approx(0.5)
    itl = m.histogram("pdbox_itl_seconds")
    assert itl.count == 2 and itl.total == pytest.approx(0.3)
    assert m.histogram("pdbox_tpot_seconds").total == pytest.approx(0.15)
    assert m.histogram("pdbox_e2e_seconds").total == pytest.approx(0.8)
    assert m.histogram("pdbox_batch_size").count == 3
    assert m.value("pdbox_engine_requests_total", reason="length") == 1
    assert not wm._last_token and not wm._first_token


def test_instrumented_schedule_hands_the_batch_to_on_step() -> None:
    worker = _fake_worker()
    sb = SimpleNamespace(requests=[], sample=[])
    worker.engine.scheduler.schedule = lambda: sb
    wm = WorkerMetrics(worker)
    assert worker.engine.scheduler.schedule() is sb and wm._batch is sb
    wm.on_step(0.01, 0, 0)
    assert wm._batch is None and wm.batch_now.get() == 0

"""The dashboard rendered from a recorded scrape (tests/monitor/data: /metrics and /workers of a real
`pdbox up` on CPU, taken while four streams were decoding) shows the figures of that scrape."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console

from appliance.monitor.snapshot import Monitor, Snapshot
from appliance.monitor.view import render, sparkline

DATA = Path(__file__).parent / "data"


def raw(name: str, **labels: str) -> float:
    """One sample of the recorded text, found with a plain regex (independent of the parser)."""
    for line in (DATA / "metrics.txt").read_text().splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    raise KeyError(name, labels)


def p50_from_buckets(name: str) -> float:
    buckets = []
    for line in (DATA / "metrics.txt").read_text().splitlines():
        m = re.match(rf'^{name}_bucket\{{le="([^"]+)",role="router",worker="router"\}} (\S+)$', line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
    count = buckets[-1][1]
    lo, lo_c = 0.0, 0.0
    for le, c in buckets:
        if c >= count / 2:
            return lo + (le - lo) * (count / 2 - lo_c) / (c - lo_c)
        lo, lo_c = le, c
    raise AssertionError("no bucket")


def recorded_frame_text() -> str:
    workers = json.loads((DATA / "workers.json").read_text())
    snap = Snapshot.parse((DATA / "metrics.txt").read_text(), workers, at=1000.0)
    console = Console(record=True, width=80, color_system=None)
    console.print(render(Monitor("http://127.0.0.1:8000").update(snap)))
    return console.export_text()


def row_of(text: str, name: str) -> list[str]:
    return next(ln for ln in text.splitlines() if ln.startswith(name)).split()


def test_recorded_snapshot_figures() -> None:
    text = recorded_frame_text()
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines), [ln for ln in lines if len(ln) > 80]
    assert len(lines) <= 24, f"{len(lines)} lines do not fit an 80x24 terminal"
    assert "smollm2-135m-instruct" in lines[0] and "mode disagg" in lines[0] and "transport shm" in lines[0]
    up = int(raw("pdbox_uptime_seconds", role="router"))
    assert f"up 0:00:{up:02d}" in lines[0]
    assert f"in flight {raw('pdbox_router_inflight'):.0f}" in lines[1]
    ok = raw("pdbox_requests_total", endpoint="completions", outcome="ok") + raw(
        "pdbox_requests_total", endpoint="chat", outcome="ok")
    errors = raw("pdbox_errors_total", kind="404")
    assert f"requests {ok + errors:.0f}" in lines[1]
    assert f"errors {100 * errors / (ok + errors):.1f}%" in lines[1]
    assert f"{(ok + errors) / raw('pdbox_uptime_seconds', role='router'):.2f} req/s" in lines[1]

    for name, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        row = row_of(text, name)
        assert row[1] == role
        running, waiting = raw("pdbox_running_requests", worker=name), raw("pdbox_waiting_requests", worker=name)
        assert row[4] == f"{running:.0f}/{waiting:.0f}"
        assert row[5] == f"{raw('pdbox_batch_requests', worker=name):.0f}"
        assert row[7] == f"{raw('pdbox_kv_pages_used', worker=name):.0f}/{raw('pdbox_kv_pages_total', worker=name):.0f}"
        tok_s = raw("pdbox_prefill_tokens_per_second", worker=name) + raw("pdbox_decode_tokens_per_second", worker=name)
        assert float(row[8]) == float(f"{tok_s:.1f}" if tok_s < 100 else f"{tok_s:.0f}")
        assert row[9] == "ok"

    ttft = row_of(text, "TTFT")
    assert ttft[1:3] == [f"{p50_from_buckets('pdbox_ttft_seconds') * 1e3:.0f}", "ms"]
    assert ttft[5] == f"{raw('pdbox_ttft_seconds_count', role='router'):.0f}"
    tpot = row_of(text, "TPOT")
    assert tpot[1:3] == [f"{p50_from_buckets('pdbox_tpot_seconds') * 1e3:.0f}", "ms"]

    shm = row_of(text, "shm")
    sent = raw("pdbox_transfer_bytes_total", direction="sent", worker="prefill-0")
    assert " ".join(shm[1:3]) == f"{sent / 1e6:.1f} MB"
    assert shm[-3:] == [f"{raw('pdbox_transfer_rooms_total', outcome='done', worker='decode-0'):.0f}", "/", "0"]
    assert "404×1" in lines[-1]


def test_sparkline_bins_by_time() -> None:
    pts = [(t, float(t)) for t in range(0, 120)]
    line = sparkline(pts, now=119.0, span_s=120.0, width=12)
    assert len(line) == 12 and line[-1] == "█" and line[0] in "▁▂"
    assert list(line) == sorted(line)  # a rising series draws a rising line
    assert sparkline([(100.0, 5.0)], now=100.0, span_s=120.0, width=6) == "     █"
    assert sparkline([], now=0.0, span_s=60.0, width=4) == "    "


def test_a_worker_the_router_could_not_scrape_shows_its_load_and_down() -> None:
    workers = json.loads((DATA / "workers.json").read_text())
    decode = next(w for w in workers["workers"] if w["name"] == "decode-0")
    decode.update(healthy=False, restarts=1)
    text = "\n".join(ln for ln in (DATA / "metrics.txt").read_text().splitlines() if 'worker="decode-0"' not in ln)
    console = Console(record=True, width=80, color_system=None)
    console.print(render(Monitor().update(Snapshot.parse(text, workers, at=5.0))))
    row = row_of(console.export_text(), "decode-0")
    load = decode["load"]
    assert row[4] == f"{load['running']}/{load['waiting']}"
    assert row[7] == f"{load['total_pages'] - load['free_pages']}/{load['total_pages']}"
    assert row[8:] == ["–", "down", "↻1"]


def test_a_worker_sharing_cores_shows_its_borrowed_share_of_the_window() -> None:
    workers = json.loads((DATA / "workers.json").read_text())
    base = (DATA / "metrics.txt").read_text()

    def scrape(prefill_s: float) -> str:
        return base + (f'pdbox_borrowed_core_seconds_total{{role="prefill",worker="prefill-0"}} {prefill_s}\n'
                       'pdbox_borrowed_core_seconds_total{role="decode",worker="decode-0"} 3.0\n')

    mon = Monitor("http://127.0.0.1:8000")
    mon.update(Snapshot.parse(scrape(10.0), workers, at=1000.0))
    console = Console(record=True, width=80, color_system=None)
    console.print(render(mon.update(Snapshot.parse(scrape(15.0), workers, at=1010.0))))
    text = console.export_text()
    assert all(len(ln) <= 80 for ln in text.splitlines())
    line = next(ln for ln in text.splitlines() if ln.startswith("on the partner's cores too:"))
    assert line.split(":", 1)[1].split() == ["prefill-0", "50%", "decode-0", "0%"]  # 5 of the last 10 s
    assert "partner's cores" not in recorded_frame_text()  # no sharing, no line

"""What the monitor shows: one scrape of the router (``Snapshot``) and the figures derived from it
and from the scrapes before it (``Frame``), with rates and percentiles over a recent window.

With a single scrape (``pdbox monitor --once``) rates fall back to the workers' own 10 s gauges,
requests/s to the average since start, and percentiles to every request since start.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.monitor.prom import EMPTY, Histogram, Metrics
from appliance.serve.load_report import decode_load

RATE_WINDOW_S = 5.0
LATENCY_WINDOW_S = 60.0
HISTORY_S = 120.0
LATENCIES = (("TTFT", "pdbox_ttft_seconds"), ("TPOT", "pdbox_tpot_seconds"), ("ITL", "pdbox_itl_seconds"),
             ("E2E", "pdbox_e2e_seconds"))
ROUTER = {"role": "router"}


class MonitorError(Exception):
    """The router could not be scraped (the message says why)."""


@dataclass(frozen=True)
class Snapshot:
    """One scrape: the router's merged /metrics and its /workers listing, taken at ``at``."""

    at: float
    metrics: Metrics
    workers: dict[str, Any]

    @classmethod
    def parse(cls, metrics_text: str, workers: dict[str, Any], at: float | None = None) -> Snapshot:
        return cls(time.monotonic() if at is None else at, Metrics.from_text(metrics_text), workers)


async def fetch_snapshot(session: Any, url: str, api_key: str = "", timeout_s: float = 5.0) -> Snapshot:
    """GET ``/metrics`` and ``/workers`` from the router at ``url`` (an aiohttp session)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def get(path: str) -> aiohttp.ClientResponse:
        resp = await session.get(url.rstrip("/") + path, headers=headers, timeout=timeout)
        if resp.status == 401:
            resp.release()
            raise MonitorError(f"{url} wants an API key: pass --api-key or set PDBOX_API_KEY")
        if resp.status != 200:
            resp.release()
            raise MonitorError(f"{url}{path} answered HTTP {resp.status}")
        return resp

    try:
        m, w = await asyncio.gather(get("/metrics"), get("/workers"))
        async with m, w:
            text, workers = await m.text(), await w.json(content_type=None)
        return Snapshot.parse(text, workers)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise MonitorError(f"cannot reach the router at {url}: {exc or type(exc).__name__}") from None
    except ValueError as exc:
        raise MonitorError(f"{url} did not answer like a pdbox router: {exc}") from None


# -- the derived figures ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerRow:
    name: str
    role: str
    devices: str
    tp: int
    healthy: bool
    restarts: int
    running: int
    waiting: int
    batch: int
    kv_used: int
    kv_cached: int
    kv_total: int
    tok_s: float | None  # None: no figure yet (the worker's metrics were not scraped)
    hit_rate: float
    borrowed: float | None = None  # share of the last window run on its partner's cores too; None: not sharing


@dataclass(frozen=True)
class LatencyRow:
    name: str
    p50: float
    p99: float
    count: float
    window_s: float | None = None  # the observations cover the last window_s seconds; None: since start


@dataclass(frozen=True)
class TransferRow:
    backend: str
    bytes_sent: float
    gbps: float
    write_p50: float
    handoff_p50: float
    handoff_p99: float
    rooms_done: float
    rooms_failed: float


@dataclass(frozen=True)
class Frame:
    url: str
    model: str
    mode: str
    transport: str
    uptime_s: float
    req_s: float
    error_rate: float
    inflight: int
    requests: float
    tok_s: float
    workers: tuple[WorkerRow, ...]
    latency: tuple[LatencyRow, ...]
    transfers: tuple[TransferRow, ...]
    errors: dict[str, float]
    window_s: float | None  # the window rates cover; None: since start
    at: float = 0.0  # monotonic time of the scrape
    history_s: float = HISTORY_S  # the span sparklines cover
    spark: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)  # name -> (at, value)
    problem: str = ""  # the last scrape failed: why (the figures are from the scrape before)
    adaptive: str = ""  # --mode auto: decisions so far, role switches, the last decision and its reason


@dataclass(frozen=True)
class _Point:
    """The cumulative counts of one scrape that windowed figures are computed from."""

    at: float
    answered: float  # requests that got an answer that was not an error
    errors: float
    tokens: dict[str, float]  # worker -> prompt + decoded tokens
    sent: dict[str, float]  # backend -> bytes sent
    hist: dict[str, Histogram]
    borrowed: dict[str, float] = field(default_factory=dict)  # worker -> seconds on its partner's cores


def _nan_if_empty(h: Histogram, q: float) -> float:
    return h.quantile(q) if h.count else math.nan


class Monitor:
    """Keeps the recent scrapes and turns the newest into a ``Frame``."""

    def __init__(self, url: str = "", history_s: float = HISTORY_S) -> None:
        self.url = url
        self.history_s = history_s
        self.points: deque[_Point] = deque()
        self.series: dict[str, deque[tuple[float, float]]] = {k: deque() for k in ("req_s", "tok_s", "ttft", "gbps")}
        self.last: Frame | None = None

    def _point(self, snap: Snapshot) -> _Point:
        m = snap.metrics
        answered = sum(s.value for s in m.series("pdbox_requests_total", **ROUTER)
                       if s.labels.get("outcome") not in ("error", "rejected"))
        tokens = {}
        for name in m.label_values("pdbox_kv_pages_total", "worker"):
            tokens[name] = m.value("pdbox_prefill_tokens_total", worker=name) + m.value(
                "pdbox_decode_tokens_total", worker=name)
        sent = {b: m.value("pdbox_transfer_bytes_total", backend=b, direction="sent")
                for b in m.label_values("pdbox_transfer_bytes_total", "backend")}
        hist = {name: m.histogram(metric, **ROUTER) for name, metric in LATENCIES}
        for b in sent:
            hist[f"write:{b}"] = m.histogram("pdbox_transfer_write_seconds", backend=b)
            hist[f"handoff:{b}"] = m.histogram("pdbox_kv_handoff_seconds", backend=b)
        borrowed = {name: m.value("pdbox_borrowed_core_seconds_total", worker=name)
                    for name in m.label_values("pdbox_borrowed_core_seconds_total", "worker")}
        return _Point(snap.at, answered, m.value("pdbox_errors_total", **ROUTER), tokens, sent, hist, borrowed)

    def _base(self, now: float, window_s: float) -> _Point | None:
        """The newest earlier point at least ``window_s`` old (else the oldest earlier one)."""
        earlier = list(self.points)[:-1]
        if not earlier:
            return None
        old = [p for p in earlier if now - p.at >= window_s]
        return old[-1] if old else earlier[0]

    def update(self, snap: Snapshot) -> Frame:
        cur = self._point(snap)
        self.points.append(cur)
        while self.points and cur.at - self.points[0].at > max(self.history_s, LATENCY_WINDOW_S) + 1:
            self.points.popleft()
        frame = self._frame(snap, cur)
        for key, value in (("req_s", frame.req_s), ("tok_s", frame.tok_s), ("gbps", sum(t.gbps for t in
                                                                                           frame.transfers)),
                           ("ttft", self._recent_ttft(cur))):
            s = self.series[key]
            s.append((cur.at, value))
            while s and cur.at - s[0][0] > self.history_s:
                s.popleft()
        spark = {k: tuple(s) for k, s in self.series.items()}
        frame = replace(frame, spark=spark, at=cur.at, history_s=self.history_s)
        self.last = frame
        return frame

    def failed(self, why: str) -> Frame | None:
        """The last frame, marked with why this scrape failed (None before any success)."""
        if self.last is None:
            return None
        return replace(self.last, problem=why)

    def _recent_ttft(self, cur: _Point) -> float:
        base = self._base(cur.at, RATE_WINDOW_S)
        if base is None:
            return math.nan
        return _nan_if_empty(cur.hist["TTFT"].minus(base.hist.get("TTFT", EMPTY)), 0.5)

    def _frame(self, snap: Snapshot, cur: _Point) -> Frame:
        m = snap.metrics
        info = snap.workers
        uptime = m.value("pdbox_uptime_seconds", **ROUTER)
        rate_base = self._base(cur.at, RATE_WINDOW_S)
        lat_base = self._base(cur.at, LATENCY_WINDOW_S)
        requests = cur.answered + cur.errors
        if rate_base is not None and cur.at > rate_base.at:
            dt = cur.at - rate_base.at
            d_answered = max(0.0, cur.answered - rate_base.answered)
            d_errors = max(0.0, cur.errors - rate_base.errors)
            req_s = (d_answered + d_errors) / dt
            error_rate = d_errors / (d_answered + d_errors) if d_answered + d_errors else 0.0
            window: float | None = dt
        else:
            req_s = requests / uptime if uptime > 0 else 0.0
            error_rate = cur.errors / requests if requests else 0.0
            window = None
        workers = tuple(self._worker_row(m, w, cur, rate_base) for w in info.get("workers", []))
        latency = []
        for name, _ in LATENCIES:
            h, span = cur.hist[name], None
            if lat_base is not None:  # the recent window when it saw requests, else everything since start
                recent = h.minus(lat_base.hist.get(name, EMPTY))
                if recent.count:
                    h, span = recent, cur.at - lat_base.at
            latency.append(LatencyRow(name, _nan_if_empty(h, 0.5), _nan_if_empty(h, 0.99), h.count, span))
        transfers = tuple(self._transfer_row(m, b, cur, rate_base, lat_base) for b in cur.sent)
        transport = next((w.get("transport") for w in info.get("workers", []) if w.get("transport")), "") or "-"
        errors = {s.labels.get("kind", "?"): s.value for s in m.series("pdbox_errors_total", **ROUTER) if s.value}
        tok_s = sum(w.tok_s or 0.0 for w in workers)
        return Frame(url=self.url, model=str(info.get("model", "?")), mode=str(info.get("mode", "?")),
                     transport=transport, uptime_s=uptime, req_s=req_s, error_rate=error_rate,
                     inflight=int(m.value("pdbox_router_inflight", **ROUTER)), requests=requests, tok_s=tok_s,
                     workers=workers, latency=tuple(latency), transfers=transfers, errors=errors, window_s=window,
                     adaptive=self._adaptive(m, info))

    @staticmethod
    def _adaptive(m: Metrics, info: dict[str, Any]) -> str:
        """One line for --mode auto: how requests were placed, role switches, and the last decision."""
        if "role_switches" not in info:
            return ""
        counts: dict[str, float] = {}
        for s in m.series("pdbox_auto_decisions_total", **ROUTER):
            counts[s.labels.get("decision", "?")] = counts.get(s.labels.get("decision", "?"), 0.0) + s.value
        placed = " ".join(f"{k} {v:.0f}" for k, v in sorted(counts.items())) or "no decisions yet"
        moved = f", {info['decodes_moved']} decodes moved" if "decodes_moved" in info else ""
        if info.get("decode_moves_failed"):
            moved += f" ({info['decode_moves_failed']} failed)"
        return (f"auto: {placed}, {info['role_switches']} role switches{moved}; "
                f"last: {info.get('last_decision') or '-'}")

    @staticmethod
    def _worker_row(m: Metrics, w: dict[str, Any], cur: _Point, base: _Point | None) -> WorkerRow:
        name = str(w.get("name", "?"))
        load = decode_load(w.get("load") or {})
        scraped = m.has("pdbox_kv_pages_total", worker=name)

        def figure(metric: str, reported: int) -> int:
            return int(m.value(metric, worker=name)) if scraped else reported

        total = figure("pdbox_kv_pages_total", load.total_pages)
        if scraped:
            used = int(m.value("pdbox_kv_pages_used", worker=name))
        else:
            used = total - load.free_pages
        tok_s: float | None = None
        if scraped:
            if base is not None and name in base.tokens and cur.at > base.at:
                tok_s = max(0.0, cur.tokens[name] - base.tokens[name]) / (cur.at - base.at)
            else:
                tok_s = m.value("pdbox_prefill_tokens_per_second", worker=name) + m.value(
                    "pdbox_decode_tokens_per_second", worker=name)
        borrowed: float | None = None
        if name in cur.borrowed:  # a CPU engine that shares cores with its partner
            if base is not None and name in base.borrowed and cur.at > base.at:
                borrowed = min(1.0, max(0.0, cur.borrowed[name] - base.borrowed[name]) / (cur.at - base.at))
            else:
                borrowed = 0.0
        role = str(w.get("role", "?"))
        if w.get("leaning"):  # --mode auto: every engine is "auto"; show which way it leans now
            role = f"auto:{w['leaning']}"
        return WorkerRow(name=name, role=role, devices=str(w.get("devices", "")),
                         tp=int(w.get("tp") or 1), healthy=bool(w.get("healthy")), restarts=int(w.get("restarts", 0)),
                         running=figure("pdbox_running_requests", load.running),
                         waiting=figure("pdbox_waiting_requests", load.waiting),
                         batch=int(m.value("pdbox_batch_requests", worker=name)), kv_used=used,
                         kv_cached=figure("pdbox_kv_pages_cached", load.cached_pages), kv_total=total, tok_s=tok_s,
                         hit_rate=m.value("pdbox_prefix_cache_hit_rate", worker=name), borrowed=borrowed)

    @staticmethod
    def _transfer_row(m: Metrics, backend: str, cur: _Point, base: _Point | None,
                      lat_base: _Point | None) -> TransferRow:
        if base is not None and backend in base.sent and cur.at > base.at:
            gbps = max(0.0, cur.sent[backend] - base.sent[backend]) / (cur.at - base.at) / 1e9
        else:
            gbps = m.value("pdbox_transfer_gbps", backend=backend, direction="sent")

        def recent(key: str) -> Histogram:
            h = cur.hist[key]
            if lat_base is not None:
                d = h.minus(lat_base.hist.get(key, EMPTY))
                return d if d.count else h
            return h

        handoff = recent(f"handoff:{backend}")
        return TransferRow(backend=backend, bytes_sent=cur.sent[backend], gbps=gbps,
                           write_p50=_nan_if_empty(recent(f"write:{backend}"), 0.5),
                           handoff_p50=_nan_if_empty(handoff, 0.5), handoff_p99=_nan_if_empty(handoff, 0.99),
                           rooms_done=m.value("pdbox_transfer_rooms_total", backend=backend, outcome="done"),
                           rooms_failed=m.value("pdbox_transfer_rooms_total", backend=backend, outcome="failed"))

"""Render a ``Frame`` as rich renderables that fit an 80x24 terminal (two workers take 19 lines)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from appliance.monitor.snapshot import Frame, TransferRow, WorkerRow

SPARKS = "▁▂▃▄▅▆▇█"
ROLE_STYLE = {"prefill": "cyan", "decode": "magenta", "unified": "green", "auto": "yellow",
              "auto:prefill": "cyan", "auto:decode": "magenta"}
BAR_WIDTH = 6
SPARK_WIDTH = 20


def fmt_seconds(s: float) -> str:
    if s is None or math.isnan(s):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s" if s < 100 else f"{s:.0f} s"


def fmt_uptime(s: float) -> str:
    s = int(max(0.0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_count(n: int) -> str:
    return str(n) if n < 10_000 else f"{n / 1000:.0f}k"


def fmt_rate(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def fmt_gbps(x: float) -> str:
    if math.isnan(x):
        return "–"
    if x >= 1:
        return f"{x:.2f} GB/s"
    return f"{x * 1e3:.1f} MB/s"


def sparkline(points: Sequence[tuple[float, float]], now: float, span_s: float, width: int = SPARK_WIDTH) -> str:
    """``width`` characters covering ``span_s`` seconds up to ``now``; blank where no data.

    Each character is the mean of its time bin, scaled to the largest mean shown (0 -> lowest).
    """
    bins: list[list[float]] = [[] for _ in range(width)]
    for at, v in points:
        age = now - at
        if 0 <= age <= span_s and not math.isnan(v):
            bins[min(width - 1, int((span_s - age) / span_s * width))].append(v)
    means = [sum(b) / len(b) if b else None for b in bins]
    top = max((v for v in means if v is not None), default=0.0)
    out = []
    for v in means:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5)) if top > 0 else 0])
    return "".join(out)


def kv_bar(w: WorkerRow, width: int = BAR_WIDTH) -> Text:
    """Pages held by requests (solid), by the prefix cache only (shaded), free (light)."""
    total = max(1, w.kv_total)
    active = max(0, w.kv_used - w.kv_cached)
    n_active = round(width * active / total)
    n_used = max(n_active, round(width * w.kv_used / total))
    if w.kv_used and n_used == 0:
        n_used = 1
    frac = w.kv_used / total
    color = "green" if frac < 0.7 else "yellow" if frac < 0.9 else "red"
    bar = Text()
    bar.append("█" * n_active, style=color)
    bar.append("▒" * (n_used - n_active), style=color)
    bar.append("░" * (width - n_used), style="grey50")
    bar.append(f" {fmt_count(w.kv_used)}/{fmt_count(w.kv_total)}")
    return bar


def header(frame: Frame) -> Text:
    t = Text()
    t.append("pdbox", style="bold")
    t.append(f"  {frame.model}  ", style="bold cyan")
    t.append(f"mode {frame.mode}  transport {frame.transport}  up {fmt_uptime(frame.uptime_s)}\n")
    t.append(f"{frame.req_s:.2f} req/s", style="bold")
    t.append(" done", style="dim")
    err_style = "bold red" if frame.error_rate > 0 else ""
    t.append("  errors ")
    t.append(f"{frame.error_rate * 100:.1f}%", style=err_style)
    t.append(f"  in flight {frame.inflight}  requests {frame.requests:.0f}  tok/s {fmt_rate(frame.tok_s)}")
    window = f"last {frame.window_s:.0f} s" if frame.window_s else "since start"
    t.append(f"  [{window}]", style="dim")
    return t


def workers_table(frame: Frame) -> Table:
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, expand=False, show_edge=False)
    for name, justify in (("worker", "left"), ("role", "left"), ("devices", "left"), ("TP", "right"),
                          ("run/wait", "right"), ("batch", "right"), ("KV used", "left"), ("tok/s", "right"),
                          ("health", "left")):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for w in frame.workers:
        health = Text("ok", style="green") if w.healthy else Text("down", style="bold red")
        if w.restarts:
            health.append(f" ↻{w.restarts}", style="yellow")
        t.add_row(w.name, Text(w.role, style=ROLE_STYLE.get(w.role, "")), w.devices or "-", str(w.tp),
                  f"{fmt_count(w.running)}/{fmt_count(w.waiting)}", str(w.batch), kv_bar(w), fmt_rate(w.tok_s), health)
    return t


def latency_table(frame: Frame) -> Table:
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    span = frame.latency[0].window_s if frame.latency else None
    t.add_column(f"last {span:.0f}s" if span else "all time", no_wrap=True, min_width=8)
    t.add_column("p50", justify="right", no_wrap=True, min_width=6)
    t.add_column("p99", justify="right", no_wrap=True, min_width=6)
    t.add_column("n", justify="right", no_wrap=True, min_width=5)
    for row in frame.latency:
        name = Text(row.name)
        if span and row.window_s is None:  # nothing in the window: this row covers everything since start
            name.append("*", style="dim")
        t.add_row(name, fmt_seconds(row.p50), fmt_seconds(row.p99), f"{row.count:.0f}")
    return t


def spark_table(frame: Frame) -> Table:
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    t.add_column(f"{frame.history_s / 60:.0f} min", no_wrap=True)
    t.add_column("", no_wrap=True, style="cyan")
    t.add_column("now", justify="right", no_wrap=True, min_width=9)
    latest = {k: (v[-1][1] if v else math.nan) for k, v in frame.spark.items()}
    rows = (("req/s", "req_s", lambda x: f"{x:.2f}"), ("tok/s", "tok_s", fmt_rate),
            ("TTFT", "ttft", fmt_seconds), ("KV xfer", "gbps", fmt_gbps))
    for label, key, fmt in rows:
        pts = frame.spark.get(key, ())
        t.add_row(label, sparkline(pts, frame.at, frame.history_s), fmt(latest.get(key, math.nan)))
    return t


def transfer_table(rows: Sequence[TransferRow]) -> Table:
    t = Table(box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    for name in ("KV transfer", "sent", "rate", "write p50", "handoff p50/p99", "rooms ok/failed"):
        t.add_column(name, no_wrap=True, justify="left" if name == "KV transfer" else "right")
    for r in rows:
        failed = Text(f"{r.rooms_failed:.0f}", style="bold red" if r.rooms_failed else "")
        t.add_row(r.backend, fmt_bytes(r.bytes_sent), fmt_gbps(r.gbps), fmt_seconds(r.write_p50),
                  f"{fmt_seconds(r.handoff_p50)} / {fmt_seconds(r.handoff_p99)}",
                  Text.assemble(f"{r.rooms_done:.0f} / ", failed))
    return t


def sharing_line(frame: Frame) -> Text | None:
    """CPU core sharing: the share of the window each engine also ran on its partner's cores."""
    shares = [(w.name, w.borrowed) for w in frame.workers if w.borrowed is not None]
    if not shares:
        return None
    t = Text("on the partner's cores too: ", style="dim", overflow="ellipsis", no_wrap=True)  # one line
    for name, share in shares:
        t.append(f"{name} ")
        t.append(f"{share * 100:.0f}%  ", style="cyan" if share else "dim")
    return t


def errors_line(frame: Frame) -> Text:
    t = Text("errors by kind: ", style="dim")
    if not frame.errors:
        t.append("none", style="dim")
    for kind, n in sorted(frame.errors.items()):
        t.append(f"{kind}×{n:.0f}  ", style="red")
    return t


def render(frame: Frame) -> RenderableType:
    """The whole dashboard for one frame."""
    parts: list[RenderableType] = [header(frame)]
    if frame.problem:
        parts.append(Text(f"! {frame.problem} (showing the last good scrape)", style="bold red"))
    parts.append(workers_table(frame))
    if (sharing := sharing_line(frame)) is not None:
        parts.append(sharing)
    if frame.adaptive:
        parts.append(Text(frame.adaptive, style="yellow", overflow="ellipsis", no_wrap=True))
    grid = Table.grid(padding=(0, 2))
    grid.add_row(latency_table(frame), spark_table(frame))
    parts.append(grid)
    if frame.transfers:
        parts.append(transfer_table(frame.transfers))
    parts.append(errors_line(frame))
    return Group(*parts)


def render_problem(url: str, why: str) -> RenderableType:
    """What to show before the first successful scrape."""
    return Text.assemble(("pdbox monitor ", "bold"), url, "\n", (why, "bold red"), "\n", ("retrying…", "dim"))

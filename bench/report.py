"""Presenting results: console tables for run and sweep, and the comparison report (a verdict, tables,
the SLO map and PNG plots) built from compare.json and the per-rate result files `bench compare` leaves
in its output folder, so `bench report DIR` can redo it.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch); matplotlib
is imported only when a plot is drawn, as it is slow to import.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from bench.metrics import tpots_from_result

TIE_MARGIN = 0.10  # goodputs within 10% of each other are a tie


_ORDER_TEXT = {
    "by-mode": "Modes ran one after the other on the same devices",
    "interleaved": "Modes ran interleaved, rate by rate, each on a fresh server per rate point, on the same devices",
}

def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(result: Mapping[str, Any], title: str = "Serving benchmark result") -> Table:
    """The console summary, in the order and units of `vllm bench serve`'s block."""
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    fmt = lambda v, spec=".2f": "-" if v is None else format(v, spec)
    rows = [
        ("Successful requests", fmt(result["completed"], "d")),
        ("Failed requests", fmt(result["failed"], "d")),
        ("Benchmark duration (s)", fmt(result["duration"])),
        ("Total input tokens", fmt(result["total_input_tokens"], "d")),
        ("Total generated tokens", fmt(result["total_output_tokens"], "d")),
        ("Request throughput (req/s)", fmt(result["request_throughput"])),
        ("Request goodput (req/s)", fmt(result["request_goodput"])),
        ("SLO attainment (%)", fmt(None if result["slo_attainment"] is None else 100 * result["slo_attainment"])),
        ("Output token throughput (tok/s)", fmt(result["output_throughput"])),
        ("Total token throughput (tok/s)", fmt(result["total_token_throughput"])),
    ]
    for name in ("ttft", "tpot", "itl", "e2el"):
        label = name.upper()
        rows += [
            (f"Mean {label} (ms)", fmt(result[f"mean_{name}_ms"])),
            (f"Median {label} (ms)", fmt(result[f"median_{name}_ms"])),
            (f"P90 {label} (ms)", fmt(result.get(f"p90_{name}_ms"))),
            (f"P99 {label} (ms)", fmt(result.get(f"p99_{name}_ms"))),
        ]
    for metric, value in rows:
        table.add_row(metric, value)
    return table


def sweep_table(points: Sequence[Mapping[str, Any]], title: str) -> Table:
    """One row per rate point of a sweep."""
    table = Table(title=title)
    for col in ("rate", "req/s", "goodput", "attain %", "p50 TTFT", "p99 TTFT", "p50 TPOT", "p99 TPOT", "failed"):
        table.add_column(col, justify="right")
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
    for p in points:
        attain = None if p["slo_attainment"] is None else 100 * p["slo_attainment"]
        table.add_row(
            fmt(p["rate"], "g"),
            fmt(p["request_throughput"], ".2f"),
            fmt(p["request_goodput"], ".2f"),
            fmt(attain),
            fmt(p["p50_ttft_ms"]),
            fmt(p["p99_ttft_ms"]),
            fmt(p["p50_tpot_ms"]),
            fmt(p["p99_tpot_ms"]),
            str(p["failed"]),
        )
    return table


def verdict(summary: Mapping[str, Any]) -> str:
    """One sentence per challenger against the reference mode, on goodput at the default SLO."""
    modes = summary["modes"]
    ref = summary["reference_mode"]
    base = modes[ref]["goodput"] or 0.0
    sentences = []
    for name, mode in modes.items():
        if name == ref:
            continue
        goodput = mode["goodput"] or 0.0
        if base == 0 and goodput == 0:
            sentences.append(
                f"Neither {ref} nor {name} kept 90% of requests within the SLO at any rate tried; "
                "rerun with lower --rates."
            )
        elif base == 0 or goodput >= base * (1 + TIE_MARGIN):
            ratio = f" ({goodput / base:.2f}x)" if base else ""
            sentences.append(f"{name} wins: {goodput:g} req/s goodput against {base:g} for {ref}{ratio}.")
        elif goodput == 0 or goodput <= base / (1 + TIE_MARGIN):
            ratio = f" ({base / goodput:.2f}x)" if goodput else ""
            sentences.append(f"{ref} wins: {base:g} req/s goodput against {goodput:g} for {name}{ratio}.")
        else:
            sentences.append(f"{ref} and {name} tie: {base:g} and {goodput:g} req/s goodput.")
        top = max(summary.get("rates") or [math.inf])
        if base == goodput == top:
            sentences.append("Both held the SLO at the highest rate tried; add higher --rates to separate them.")
        grids = summary["slo_map"]["goodput"]
        cells = [(a, b) for row_a, row_b in zip(grids[ref], grids[name]) for a, b in zip(row_a, row_b)]
        wins = sum(b > a for a, b in cells)
        losses = sum(b < a for a, b in cells)
        sentences.append(
            f"Across the {len(cells)} SLOs of the map, {name} has more goodput in {wins}, "
            f"less in {losses}, the same in {len(cells) - wins - losses}."
        )
    adaptive = adaptive_check(summary)
    if adaptive:
        sentences.append(adaptive)
    return " ".join(sentences)


def peak_request_goodput(mode: Mapping[str, Any]) -> float:
    """The most SLO-meeting requests per second any rate point delivered."""
    return max((r["request_goodput"] or 0.0 for r in mode["sweep"]), default=0.0)


def adaptive_check(summary: Mapping[str, Any], floor: float = 0.95) -> str:
    """auto against the better of unified and disagg (issue target: >= 0.95x), on both goodput measures."""
    modes = summary["modes"]
    if "auto" not in modes or not {"unified", "disagg"} <= modes.keys():
        return ""
    parts = []
    for label, measure in (("goodput", lambda m: m["goodput"] or 0.0), ("peak request goodput", peak_request_goodput)):
        fixed = {n: measure(modes[n]) for n in ("unified", "disagg")}
        best_name = max(fixed, key=lambda n: fixed[n])
        best, auto = fixed[best_name], measure(modes["auto"])
        ratio = f"{auto / best:.2f}x" if best else "n/a"
        if best and auto >= best * floor:
            outcome = "better than both" if auto > max(fixed.values()) else f"within {floor:g}x"
        else:
            outcome = f"below {floor:g}x" if best else "n/a"
        parts.append(f"{label} {auto:.3g} vs {best:.3g} for {best_name} ({ratio}: {outcome})")
    return "Adaptive target: auto " + "; ".join(parts) + "."


def placement_lines(summary: Mapping[str, Any]) -> list[str]:
    """The adaptive router's own account of each rate point: decisions by reason, switches, final leanings."""
    rows = [(name, p) for name, m in summary["modes"].items() for p in m.get("placement", [])]
    if not rows:
        return []
    lines = ["", "## Adaptive placement (the router's counters, per rate point)", "",
             "| mode | rate | local | disagg | by reason | role switches | decodes moved | leanings after |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in rows:
        d = p["decisions"]
        local = sum(v for k, v in d.items() if k.startswith("local:"))
        disagg = sum(v for k, v in d.items() if k.startswith("disagg:"))
        reasons = ", ".join(f"{k} {v:.0f}" for k, v in sorted(d.items()))
        leanings = ", ".join(f"{w} {lean}" for w, lean in sorted(p["leanings"].items()))
        moved = f"{p.get('decodes_moved', '-')}" + (f" ({p['decode_moves_failed']} failed)"
                                                    if p.get("decode_moves_failed") else "")
        lines.append(f"| {name} | {p['rate']:g} | {local:.0f} | {disagg:.0f} | {reasons} | {p['role_switches']} | "
                     f"{moved} | {leanings} |")
    return lines


def reference_results(out_dir: Path, summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each mode's result.json at the reference rate, as `bench compare` wrote it."""
    rate = summary["reference_rate"]
    return {name: json.loads((out_dir / name / f"rate_{rate:g}.json").read_text()) for name in summary["modes"]}


def _cdf_plot(path: Path, series: Mapping[str, Sequence[float]], xlabel: str, title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, values in series.items():
        if len(values):
            xs = np.sort(np.asarray(values) * 1000.0)
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=name)
    ax.set(xlabel=xlabel, ylabel="fraction of requests", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def _rate_plot(path: Path, modes: Mapping[str, Any], panels: Sequence[tuple[str, str]], title: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, mode in modes.items():
            rows = [r for r in mode["sweep"] if r.get(key) is not None]
            scale = 100.0 if key == "slo_attainment" else 1.0
            ax.plot([r["rate"] for r in rows], [r[key] * scale for r in rows], marker="o", label=name)
        if key == "slo_attainment":
            ax.axhline(90, color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="offered rate (req/s)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return path


def write_plots(out_dir: Path, summary: Mapping[str, Any]) -> list[Path]:
    """TTFT and TPOT CDFs at the reference rate; goodput, SLO attainment and P99 latencies vs rate."""
    results = reference_results(out_dir, summary)
    rate = summary["reference_rate"]
    ttfts = {n: [t for t, e in zip(r["ttfts"], r["errors"]) if not e] for n, r in results.items()}
    tpots = {n: tpots_from_result(r) for n, r in results.items()}
    modes = summary["modes"]
    return [
        _cdf_plot(out_dir / "ttft_cdf.png", ttfts, "TTFT (ms)", f"TTFT CDF at {rate:g} req/s"),
        _cdf_plot(out_dir / "tpot_cdf.png", tpots, "TPOT (ms)", f"TPOT CDF at {rate:g} req/s"),
        _rate_plot(
            out_dir / "goodput_vs_rate.png",
            modes,
            [("request_goodput", "requests/s within SLO"), ("slo_attainment", "SLO attainment (%)")],
            "Goodput vs offered rate",
        ),
        _rate_plot(
            out_dir / "p99_vs_rate.png",
            modes,
            [("p99_ttft_ms", "P99 TTFT (ms)"), ("p99_tpot_ms", "P99 TPOT (ms)"), ("p99_itl_ms", "P99 ITL (ms)")],
            "P99 latency vs offered rate",
        ),
    ]


def _slo_text(slo: Mapping[str, Any]) -> str:
    if slo["kind"] == "absolute":
        return f"absolute: TTFT <= {_fmt(slo['ttft_ms'], 'g')} ms, TPOT <= {_fmt(slo['tpot_ms'], 'g')} ms"
    return (
        f"relative: TTFT <= {slo['k_ttft']:g} x isolated TTFT of the prompt's length bucket + "
        f"{slo['ttft_slack_s']:g} s, TPOT <= {slo['k_tpot']:g} x isolated TPOT"
        + (" of the bucket" if slo.get("baseline", {}).get("tpot_s_by_bucket") else "")
    )


def render_markdown(summary: Mapping[str, Any], plots: Sequence[Path]) -> str:
    """report.md: verdict, setup, the reference-rate table, every rate, the SLO map, the baseline, plots."""
    modes = summary["modes"]
    names = list(modes)
    rate = summary["reference_rate"]
    slo = summary["slo"]
    lines = [
        f"# pdbox compare: {' vs '.join(names)}",
        "",
        f"**Verdict.** {summary['verdict']}",
        "",
        f"Workload `{summary['workload']}`, {summary['num_requests']} requests per rate, seed {summary['seed']}, "
        f"offered rates {', '.join(f'{r:g}' for r in summary['rates'])} req/s ({summary['arrival']} arrivals), "
        f"`{summary['endpoint']}` "
        f"endpoint. {_ORDER_TEXT[summary.get('order', 'by-mode')]}, launched with `{summary['launch']}`.",
        "",
        f"SLO ({_slo_text(slo)}). Goodput is the highest offered rate at which at least "
        f"{slo['attainment_target']:.0%} of requests meet it (DistServe); its resolution is the rate grid.",
        "",
        f"## At {rate:g} req/s, where {summary['reference_mode']}'s request goodput peaks",
        "",
        "| mode | goodput (req/s) | throughput (req/s) | within SLO | p50 TTFT (ms) | p99 TTFT (ms) "
        "| p50 TPOT (ms) | p99 TPOT (ms) | p99 ITL (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        attain = None if m["slo_attainment"] is None else 100 * m["slo_attainment"]
        lines.append(
            f"| {name} | {_fmt(m['goodput'], 'g')} | {_fmt(m['request_throughput'], '.2f')} | "
            f"{_fmt(attain, '.0f')}% | {_fmt(m['p50_ttft_ms'])} | {_fmt(m['p99_ttft_ms'])} | "
            f"{_fmt(m['p50_tpot_ms'])} | {_fmt(m['p99_tpot_ms'])} | {_fmt(m['p99_itl_ms'])} |"
        )
    lines += [
        "",
        "## Every rate",
        "",
        "| mode | rate | throughput (req/s) | goodput (req/s) | within SLO | p99 TTFT (ms) | p99 TPOT (ms) | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modes.items():
        for r in m["sweep"]:
            attain = None if r["slo_attainment"] is None else 100 * r["slo_attainment"]
            lines.append(
                f"| {name} | {r['rate']:g} | {_fmt(r['request_throughput'], '.2f')} | "
                f"{_fmt(r['request_goodput'], '.2f')} | {_fmt(attain, '.0f')}% | {_fmt(r['p99_ttft_ms'])} | "
                f"{_fmt(r['p99_tpot_ms'])} | {r['failed']} |"
            )
    smap = summary["slo_map"]
    lines += [
        "",
        "## SLO map",
        "",
        f"Goodput (req/s) of {' / '.join(names)} for TTFT <= k_ttft x isolated + {smap['ttft_slack_s']:g} s "
        "(rows) and TPOT <= k_tpot x isolated (columns).",
        "",
        "| k_ttft \\ k_tpot | " + " | ".join(f"{k:g}" for k in smap["k_tpot"]) + " |",
        "|---|" + "---|" * len(smap["k_tpot"]),
    ]
    for i, k_ttft in enumerate(smap["k_ttft"]):
        cells = [" / ".join(f"{smap['goodput'][n][i][j]:g}" for n in names) for j in range(len(smap["k_tpot"]))]
        lines.append(f"| {k_ttft:g} | " + " | ".join(cells) + " |")
    lines += placement_lines(summary)
    iso = slo["isolated"]
    lines += [
        "",
        f"## Isolated baseline (on {summary['reference_mode']}, one request at a time)",
        "",
        f"TPOT {iso['tpot_ms']:.1f} ms (median of all).",
        "",
        "| prompt tokens | TTFT (ms) | TPOT (ms) |",
        "|---|---|---|",
    ]
    tpots = iso.get("tpot_ms_by_bucket", {})
    lines += [f"| {bucket} | {ttft:.1f} | {_fmt(tpots.get(bucket))} |" for bucket, ttft in iso["ttft_ms"].items()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Raw data: `compare.json`, `isolated.json`, and `<mode>/rate_<R>.json` (vLLM result keys).", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write the plots and report.md into `out_dir`; return the report's path."""
    plots = write_plots(out_dir, summary)
    path = out_dir / "report.md"
    path.write_text(render_markdown(summary, plots), encoding="utf-8")
    return path

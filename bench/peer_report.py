"""The `bench peer` report: one row per (workload, metric) with both servers' values and pdbox/peer,
written as OUT/peer-report.json and OUT/peer-report.md, and shown as a console table."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from bench.peer_workloads import PeerMetric, PeerWorkload
from bench.run import write_json

_ROLES = ("peer", "pdbox")


def metric_value(result: Mapping[str, Any], key: str) -> float | None:
    """A metric of a run, or None when no request succeeded (vLLM's 0 there would read as a fast server)."""
    value = result.get(key)
    if not result["completed"] or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def ratio(pdbox: float | None, peer: float | None) -> float | None:
    """pdbox / peer, or None when either is missing or the peer's is 0."""
    return pdbox / peer if pdbox is not None and peer else None


def winner(metric: PeerMetric, peer: float | None, pdbox: float | None, names: Mapping[str, str]) -> str | None:
    """The name of the server with the better value, "tie" when equal, None when one is missing."""
    if peer is None or pdbox is None:
        return None
    if peer == pdbox:
        return "tie"
    pdbox_wins = pdbox > peer if metric.better == "higher" else pdbox < peer
    return names["pdbox" if pdbox_wins else "peer"]


def _no_winner(row: Mapping[str, Any], names: Mapping[str, str]) -> str:
    failed = [f"{names[role]} failed {n}" for role, n in row.get("failed", {}).items() if n]
    return "none: " + ", ".join(failed) if failed else "-"


def _run_row(workload: str, role: str, result: Mapping[str, Any]) -> dict[str, Any]:
    served = [n for n in result["server_input_lens"] if n is not None]
    done = result["completed"]
    return {"workload": workload, "role": role, "completed": done, "failed": result["failed"],
            "duration_s": result["duration"],
            "prompt_tokens_mean": result["total_input_tokens"] / done if done else None,
            "server_prompt_tokens_mean": sum(served) / len(served) if served else None,
            "errors": sorted({e for e in result["errors"] if e})[:3]}


def summarize(
    workloads: Sequence[PeerWorkload],
    seed: int,
    servers: Mapping[str, Mapping[str, Any]],
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """peer-report.json: when, how, both servers, the workloads, the side-by-side rows and each run."""
    names = {role: str(servers[role]["name"]) for role in _ROLES}
    rows, runs = [], []
    for w in workloads:
        failed = {role: int(results[role][w.name]["failed"]) for role in _ROLES}
        for m in w.metrics:
            peer, pdbox = (metric_value(results[role][w.name], m.key) for role in _ROLES)
            # NOTE: a side whose requests failed measured fewer, easier requests: no winner then
            best = winner(m, peer, pdbox, names) if not any(failed.values()) else None
            rows.append({"workload": w.name, "label": w.label, "metric": m.key, "metric_label": m.label,
                         "better": m.better, "peer": peer, "pdbox": pdbox, "ratio": ratio(pdbox, peer),
                         "winner": best, "failed": failed})
        runs += [_run_row(w.name, role, results[role][w.name]) for role in _ROLES]
    peer = servers["peer"]
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        **meta,
        "servers": {role: dict(servers[role]) for role in _ROLES},
        "workloads": [{**w.describe(seed), "vllm_command": w.vllm_command(peer["url"], peer["model"], seed)}
                      for w in workloads],
        "rows": rows,
        "runs": runs,
    }


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_markdown(summary: Mapping[str, Any]) -> str:
    servers = summary["servers"]
    peer, pdbox = servers["peer"]["name"], servers["pdbox"]["name"]
    lines = [
        f"# {pdbox} beside {peer}: the same workloads, one after the other",
        "",
        f"- Date: {summary['date']}",
        *(f"- {s['role']}: **{s['name']}** at {s['url']}, model `{s['model']}`"
          f" (/v1/models owned_by: {s['owned_by'] or '-'})" for s in (servers["peer"], servers["pdbox"])),
        f"- Command: `{summary['command']}`",
        f"- Prompts: random token ids of `{summary['tokenizer']}` decoded to text, the same for both servers; "
        f"streamed chat completions with `max_completion_tokens`, `ignore_eos`, temperature 0. "
        f"{peer} ran every workload first, then {pdbox}, each after the same {summary['warmup']} untimed "
        "warm-up request(s).",
    ]
    if summary["scale"] != 1:
        lines.append(f"- Scaled by {summary['scale']:g} (fewer requests, shorter prompts, faster arrivals): "
                     "a smoke test, not a measurement.")
    lines += ["", f"| workload | metric | {peer} | {pdbox} | {pdbox}/{peer} | better |", "|---|---|--:|--:|--:|---|"]
    names = {"peer": peer, "pdbox": pdbox}
    for r in summary["rows"]:
        best = r["winner"] or _no_winner(r, names)
        lines.append(f"| {r['label']} | {r['metric_label']}, {r['better']} is better | {_num(r['peer'])} | "
                     f"{_num(r['pdbox'])} | {_x(r['ratio'])} | {best} |")
    lines += ["", "## Runs", "", "| workload | server | completed | failed | duration (s) | prompt tokens "
              "(client / server, mean) | errors |", "|---|---|--:|--:|--:|--:|---|"]
    for run in summary["runs"]:
        tokens = f"{_num(run['prompt_tokens_mean'])} / {_num(run['server_prompt_tokens_mean'])}"
        errors = "; ".join(e.replace("|", "/")[:80] for e in run["errors"]) or "-"
        lines.append(f"| {run['workload']} | {servers[run['role']]['name']} | {run['completed']} | {run['failed']} | "
                     f"{run['duration_s']:.1f} | {tokens} | {errors} |")
    lines += ["", "The server counts the chat template too. Per-request results (vLLM's result.json keys): "
              "`results/ROLE-WORKLOAD.json`.", "", "## The same shapes with vLLM's own client", "", "```"]
    lines += [w["vllm_command"] for w in summary["workloads"]]
    lines += ["```", ""]
    return "\n".join(lines)


def write_peer_report(out_dir: Path, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """OUT/peer-report.md and OUT/peer-report.json."""
    json_path = write_json(out_dir / "peer-report.json", summary, indent=2)
    md_path = out_dir / "peer-report.md"
    md_path.write_text(render_markdown(summary), encoding="utf-8")
    return md_path, json_path


def peer_table(summary: Mapping[str, Any]) -> Table:
    """The side-by-side rows for the console."""
    peer, pdbox = (summary["servers"][role]["name"] for role in _ROLES)
    table = Table(title=f"{pdbox} beside {peer}")
    for col, justify in (("workload", "left"), ("metric", "left"), (peer, "right"), (pdbox, "right"),
                         (f"{pdbox}/{peer}", "right"), ("better", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in summary["rows"]:
        table.add_row(r["workload"], r["metric_label"], _num(r["peer"]), _num(r["pdbox"]), _x(r["ratio"]),
                      r["winner"] or "-")
    return table

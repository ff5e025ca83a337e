"""Does ``pdbox up`` hold its memory under load? ``python -m bench.soak [--rounds 3] [--requests 250] [-- UP ARGS]``.

Starts ``pdbox up`` (`bench.up_process`), then runs ``pdbox bench run`` ``--rounds`` times against it
(``--requests`` each, ``--concurrency`` in flight, a new seed a round), and after each round (and once
before the first) reads the resident memory of the router and every worker by kind (`bench.proc_memory`:
malloc's heap, anonymous maps, ``/dev/shm`` KV pools, libraries) and the KV pages in use. It writes
``OUT/soak.json`` and prints the growth of each process over the last round: a leak grows round after
round, while KV pools and the allocator's caches fill once and stay.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import click

from appliance.cli_support import HELP_OPTIONS, run_command
from appliance.monitor.prom import Metrics
from bench.proc_memory import tree_memory
from bench.up_process import running_up


def kv_pages_used(url: str) -> dict[str, float]:
    """Each worker's KV pages not free (its requests and its prefix cache)."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.labels.get("worker", "?"): s.value for s in Metrics.from_text(text).series("pdbox_kv_pages_used")}


def bench_round(url: str, out: Path, workload: str, requests: int, concurrency: int, seed: int,
                timeout_s: float) -> dict[str, Any]:
    """One ``pdbox bench run``; its result's counts."""
    cmd = [sys.executable, "-m", "appliance.cli", "bench", "run", "--url", url, "--workload", workload,
           "--num-requests", str(requests), "--concurrency", str(concurrency), "--seed", str(seed),
           "--warmup", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"pdbox bench run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    return {"completed": result["completed"], "failed": result["failed"],
            "output_throughput": round(result.get("output_throughput", 0.0), 2)}


def growth(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each process's MiB gained by kind over the last round (``rss`` too); empty with one snapshot."""
    if len(rounds) < 2:
        return {}
    before, after = rounds[-2]["memory"], rounds[-1]["memory"]
    return {name: {k: round(v - before[name][k], 1) for k, v in mem.items()}
            for name, mem in after.items() if name in before}


@click.command(context_settings=HELP_OPTIONS)
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--requests", type=click.IntRange(1), default=250, show_default=True, help="requests a round")
@click.option("--concurrency", type=click.IntRange(1), default=6, show_default=True)
@click.option("--workload", default="mixed", show_default=True,
              type=click.Choice(["chat", "code", "long", "mixed", "rag", "shift"]))
@click.option("--seed", type=int, default=1, show_default=True, help="round i uses seed + i")
@click.option("--round-timeout-s", type=click.FloatRange(1), default=3600.0, show_default=True)
@click.option("--ready-timeout-s", type=click.FloatRange(1), default=300.0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.argument("up_args", nargs=-1, type=click.UNPROCESSED)
def command(rounds: int, requests: int, concurrency: int, workload: str, seed: int, round_timeout_s: float,
            ready_timeout_s: float, out: Path, up_args: tuple[str, ...]) -> None:
    if any(a == "--port" or a.startswith("--port=") for a in up_args):
        raise click.BadParameter("the bench picks the port itself; leave --port out", param_hint="UP_ARGS")
    out.mkdir(parents=True, exist_ok=True)
    snaps: list[dict[str, Any]] = []
    with running_up(up_args, ready_timeout_s, 30.0) as up:
        for i in range(rounds + 1):
            run = bench_round(up.url, out / f"round{i}", workload, requests, concurrency, seed + i,
                              round_timeout_s) if i else None
            time.sleep(1.0)  # the last requests' pages back, the engines idle
            snaps.append({"round": i, "run": run, "memory": tree_memory(up.proc.pid),
                          "kv_pages_used": kv_pages_used(up.url)})
            mem = ", ".join(f"{name} {m['rss']:.0f}" for name, m in snaps[-1]["memory"].items())
            counts = "" if run is None else f" ({run['completed']} ok, {run['failed']} failed)"
            print(f"round {i}{counts}: RSS MiB {mem}", file=sys.stderr, flush=True)
    result = {"up_args": list(up_args), "workload": workload, "requests": requests, "concurrency": concurrency,
              "rounds": snaps, "last_round_growth_mib": growth(snaps)}
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    for name, g in result["last_round_growth_mib"].items():
        print(f"{name}: {g['rss']:+.1f} MiB over the last round (heap {g['heap']:+.1f}, anon {g['anon']:+.1f}, "
              f"shm {g['shm']:+.1f})")
    print(f"wrote {out / 'soak.json'}")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.soak ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.soak")


if __name__ == "__main__":
    raise SystemExit(main())

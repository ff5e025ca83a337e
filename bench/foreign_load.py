"""A lone chat's TTFT and TPOT through ``pdbox up``, with its cores idle and with other work spinning on
one of them: ``python -m bench.foreign_load [--busy-cpu 1] [--requests 12] [--rounds 2] [-- UP ARGS]``.

Each round starts ``pdbox up UP_ARGS`` once per condition (idle, then busy): for the busy one, a process
outside pdbox spins on ``--busy-cpu`` (pinned there) from the moment pdbox serves until the requests are
done; then ``pdbox bench run --concurrency 1 --num-requests N --workload chat --seed S`` measures. The
figures: the medians over rounds of each run's TTFT p50 and TPOT p50, and busy / idle. What it shows is
how much of a core's worth of other work reaches a lone request (`appliance/engine/foreign_load.py`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from appliance.cli_support import HELP_OPTIONS, run_command
from bench.up_process import running_up

SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def one_run(up_args: tuple[str, ...], busy_cpu: int | None, requests: int, seed: int, timeout_s: float) -> dict:
    """TTFT and TPOT p50 (ms) of one ``pdbox bench run`` against a fresh ``pdbox up``."""
    with running_up(up_args, timeout_s, 30.0) as up, tempfile.TemporaryDirectory(prefix="pdbox-foreign-") as out:
        spin = None if busy_cpu is None else subprocess.Popen([sys.executable, "-c", SPIN, str(busy_cpu)])
        try:
            cmd = [sys.executable, "-m", "bench", "run", "--url", up.url, "--concurrency", "1", "--num-requests",
                   str(requests), "--workload", "chat", "--seed", str(seed), "--out", out]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode:
                tail = (done.stdout + done.stderr)[-4000:]
                raise RuntimeError(f"pdbox bench run failed ({done.returncode}):\n{tail}")
            result = json.loads((Path(out) / "result.json").read_text())
        finally:
            if spin is not None:
                spin.kill()
                spin.wait()
    if result["completed"] != requests:
        raise RuntimeError(f"{requests - result['completed']} of {requests} requests failed")
    return {"ttft_ms": round(result["median_ttft_ms"], 1), "tpot_ms": round(result["median_tpot_ms"], 2)}


@click.command(context_settings=HELP_OPTIONS)
@click.option("--busy-cpu", type=click.IntRange(0), default=None, help="the core other work spins on "
              "(default: the last core this process may use)")
@click.option("--requests", type=click.IntRange(1), default=12, show_default=True, help="chat requests a run")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True, help="idle and busy runs, alternated")
@click.option("--seed", type=int, default=3, show_default=True)
@click.option("--timeout-s", type=click.FloatRange(1), default=600.0, show_default=True,
              help="a start-up or a run that takes longer fails the bench")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object only")
@click.argument("up_args", nargs=-1, type=click.UNPROCESSED)
def command(busy_cpu: int | None, requests: int, rounds: int, seed: int, timeout_s: float, as_json: bool,
            up_args: tuple[str, ...]) -> None:
    if any(a == "--port" or a.startswith("--port=") for a in up_args):
        raise click.BadParameter("the bench picks the port itself; leave --port out", param_hint="UP_ARGS")
    cpus = sorted(os.sched_getaffinity(0))
    busy_cpu = cpus[-1] if busy_cpu is None else busy_cpu
    if busy_cpu not in cpus:
        raise click.BadParameter(f"cpu {busy_cpu} is not one this process may use ({cpus})", param_hint="--busy-cpu")
    runs: dict[str, list[dict]] = {"idle": [], "busy": []}
    for _ in range(rounds):
        runs["idle"].append(one_run(up_args, None, requests, seed, timeout_s))
        runs["busy"].append(one_run(up_args, busy_cpu, requests, seed, timeout_s))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("ttft_ms", "tpot_ms")} for k, v in runs.items()}
    result = {"up_args": list(up_args), "busy_cpu": busy_cpu, "requests": requests, "runs": runs, "median": med,
              "busy_over_idle": {m: round(med["busy"][m] / med["idle"][m], 2) for m in ("ttft_ms", "tpot_ms")}}
    if as_json:
        print(json.dumps(result))
        return
    for k in ("idle", "busy"):
        each = ", ".join(f"{r['ttft_ms']}/{r['tpot_ms']}" for r in runs[k])
        print(f"{k:>4} (cpu {busy_cpu} spinning: {'yes' if k == 'busy' else 'no'}): TTFT p50 "
              f"{med[k]['ttft_ms']:.1f} ms, TPOT p50 {med[k]['tpot_ms']:.2f} ms (runs, TTFT/TPOT: {each})")
    print(f"busy / idle: TTFT {result['busy_over_idle']['ttft_ms']}x, TPOT {result['busy_over_idle']['tpot_ms']}x")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.foreign_load ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.foreign_load")


if __name__ == "__main__":
    raise SystemExit(main())

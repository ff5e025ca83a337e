"""`pdbox bench …` (also `python -m bench …`): run, sweep, compare and peer against OpenAI-compatible servers.

The options the commands share are in ``cli_options.py``, progress and errors in ``cli_console.py``,
`bench peer` in ``cli_peer.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, cast

import click
from rich.console import Console

from bench.arrivals import Schedule
from bench.cli_console import Tracker, progress_bar, run_async, user_errors
from bench.cli_options import (
    BenchContext,
    LoadOptions,
    SLOOptions,
    isolated_option,
    load_options,
    model_option,
    rates_option,
    read_baseline,
    slo_options,
    url_option,
)
from bench.cli_peer import peer_cmd
from bench.client import Endpoint
from bench.compare import DEFAULT_LAUNCH, CompareConfig, LaunchConfig, run_compare
from bench.metrics import PromptBuckets, SLOPolicy
from bench.report import summary_table, sweep_table, write_report
from bench.run import build_result, measure_isolated, run_meta, run_requests, write_json
from bench.sweep import isolated_seed, parse_rates, point_seed, run_sweep, sweep_summary
from bench.workloads import warmup_requests

__all__ = ["BenchContext", "bench", "main"]  # BenchContext: what tests hand the commands (bench/cli_options.py)


@click.group(name="bench")
def bench() -> None:
    """Benchmark OpenAI-compatible servers (pdbox, vLLM, SGLang): TTFT, TPOT, ITL, goodput."""


@bench.command("run")
@url_option
@model_option
@click.option("--rate", type=float, help="Open-loop arrival rate (req/s).")
@click.option("--concurrency", type=int, help="Closed loop with C requests in flight (with --rate: a cap).")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="isolated.json (from sweep/compare) for relative SLOs.")
@slo_options
@load_options("chat")
def run_cmd(url: str, model: str | None, rate: float | None, concurrency: int | None, baseline: Path | None,
            slo_opts: SLOOptions, load: LoadOptions) -> None:
    """One run at a fixed rate or concurrency; writes OUT/result.json (vLLM --save-result keys)."""
    with user_errors():
        schedule = Schedule(rate if rate is not None else math.inf, concurrency, load.process, load.seed)
        slo: SLOPolicy | None = slo_opts.absolute()
        if slo is None and baseline is not None:
            slo = slo_opts.relative(read_baseline(baseline))
        builder = load.builder()
        requests = load.source.make(builder, load.seed)

    async def go() -> dict[str, Any]:
        config = await load.client(url, model)
        with progress_bar(Console(stderr=True)) as progress:
            tracker = Tracker(progress)
            tracker.phase(f"{load.source.label} -> {config.url}", len(requests))
            warm = warmup_requests(builder, load.warmup)
            run = await run_requests(config, requests, schedule, warm, tracker.done)
        extra = {"num_prompts": len(requests), "shared_prefix_len": builder.prefix_len,
                 "tokenizer_id": builder.codec.name}
        return build_result(run, slo, run_meta(config, schedule, load.source.label, load.seed, extra))

    result = run_async(go())
    path = write_json(load.out_dir / "result.json", result)
    console = Console()
    console.print(summary_table(result))
    console.print(f"wrote {path}")


@bench.command("sweep")
@url_option
@model_option
@rates_option
@click.option(
    "--baseline",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="isolated.json to reuse instead of measuring the isolated baseline on this server.",
)
@isolated_option
@slo_options
@load_options("chat")
def sweep_cmd(url: str, model: str | None, rates: str, baseline: Path | None, isolated_per_bucket: int,
              slo_opts: SLOOptions, load: LoadOptions) -> None:
    """A rate sweep; goodput = the highest rate with >= 90% SLO attainment. Writes OUT/sweep.json.

    Without --slo-ttft-ms/--slo-tpot-ms the SLO is relative to an isolated baseline, read from
    --baseline or measured first on this server (one request at a time) and saved as OUT/isolated.json.
    """
    with user_errors():
        rate_list = parse_rates(rates)
        source = load.source
        builder = load.builder()

    async def go() -> dict[str, Any]:
        config = await load.client(url, model)
        warm = warmup_requests(builder, load.warmup)
        with progress_bar(Console(stderr=True)) as progress:
            tracker = Tracker(progress)
            slo: SLOPolicy | None = slo_opts.absolute()
            if slo is None and baseline is not None:
                slo = slo_opts.relative(read_baseline(baseline))
            elif slo is None:
                base, isolated = await measure_isolated(
                    config, builder, source.make(builder, point_seed(load.seed, 0)), isolated_seed(load.seed),
                    PromptBuckets(), isolated_per_bucket, warmup=warm,
                    on_start=lambda n: tracker.phase("isolated baseline", n), on_done=tracker.done,
                )
                write_json(load.out_dir / "isolated.json", isolated)
                slo, warm = slo_opts.relative(base), []
            points = await run_sweep(
                config, source, builder, rate_list, load.seed, slo, load.process, warm, load.out_dir,
                on_point=lambda r, n: tracker.phase(f"rate {r:g} req/s", n), on_done=tracker.done,
            )
        meta = {"model_id": config.model, "base_url": config.base_url, "workload": source.label, "seed": load.seed}
        return {**meta, **sweep_summary(points, slo)}

    summary = run_async(go())
    path = write_json(load.out_dir / "sweep.json", summary, indent=2)
    console = Console()
    console.print(sweep_table(summary["points"], f"{summary['workload']} sweep against {url}"))
    console.print(f"goodput: {summary['goodput']:g} req/s (highest rate with >= 90% SLO attainment)")
    console.print(f"wrote {path}")


@bench.command("compare")
@rates_option
@click.option(
    "--modes",
    default="unified,disagg",
    show_default=True,
    help="Modes to launch, one after the other; the first gives the isolated baseline. NAME@N runs NAME with "
    "N cores per engine (unified@2: one unified engine on two cores).",
)
@click.option(
    "--launch",
    default=DEFAULT_LAUNCH,
    show_default=True,
    help="Command that serves a mode and prints `ready: http://HOST:PORT`; {mode} {host} {port}.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Host the launched servers bind.")
@click.option("--ready-timeout-s", type=float, default=900.0, show_default=True)
@click.option(
    "--stop-timeout-s",
    type=float,
    default=60.0,
    show_default=True,
    help="Grace after SIGTERM before the server's process group is killed.",
)
@click.option("--peer-url", help="An already-running OpenAI-compatible server (e.g. vLLM) to sweep as well.")
@click.option("--peer-name", default="peer", show_default=True)
@click.option("--interleave/--by-mode", default=False, show_default=True,
              help="Rate by rate, every mode on a fresh server per rate point (a shared machine's drift then "
                   "lands on every mode alike), instead of all rates of one mode, then the next.")
@isolated_option
@slo_options
@load_options("mixed")
def compare_cmd(rates: str, modes: str, launch: str, host: str, ready_timeout_s: float, stop_timeout_s: float,
                peer_url: str | None, peer_name: str, interleave: bool, isolated_per_bucket: int,
                slo_opts: SLOOptions, load: LoadOptions) -> None:
    """Unified vs disaggregated on the same devices: OUT/report.md, OUT/compare.json and PNG plots.

    Each mode is launched in turn (--launch), swept over the same seeded requests, and stopped with
    SIGTERM before the next starts. The default SLO is relative to the isolated baseline measured on the
    first mode; the SLO map scores every mode over k_ttft in {2,4,8} x k_tpot in {1.25,1.5,2,3}.
    """
    with user_errors():
        config = CompareConfig(
            source=load.source, rates=parse_rates(rates), out_dir=load.out_dir,
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()), seed=load.seed,
            launch=LaunchConfig(launch, host, ready_timeout_s, stop_timeout_s), endpoint=cast(Endpoint, load.endpoint),
            timeout_s=load.timeout_s, peer_url=peer_url, peer_name=peer_name, api_key=load.api_key,
            absolute_slo=slo_opts.absolute(), k_ttft=slo_opts.k_ttft, k_tpot=slo_opts.k_tpot,
            isolated_per_bucket=isolated_per_bucket, process=load.process, warmup=load.warmup,
            interleave=interleave,
        )
        builder = load.builder()

    async def go() -> dict[str, Any]:
        with progress_bar(Console(stderr=True)) as progress:
            tracker = Tracker(progress)
            summary, _ = await run_compare(config, builder, tracker.phase, tracker.done)
            return summary

    summary = run_async(go())
    write_json(load.out_dir / "compare.json", summary, indent=2)
    report = write_report(load.out_dir, summary)
    console = Console()
    for name, mode in summary["modes"].items():
        console.print(sweep_table(mode["sweep"], f"{name} ({mode['url']})"))
    console.print(f"[bold]Verdict:[/bold] {summary['verdict']}")
    console.print(f"wrote {report} and {load.out_dir / 'compare.json'}")


bench.add_command(peer_cmd)


@bench.command("report")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_cmd(out_dir: Path) -> None:
    """Redraw OUT_DIR/report.md and its plots from the compare.json and rate files already there."""
    with user_errors():
        summary = json.loads((out_dir / "compare.json").read_text())
    click.echo(f"wrote {write_report(out_dir, summary)}")


def main() -> None:
    bench(prog_name="python -m bench")

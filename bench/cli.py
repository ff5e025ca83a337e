"""`pdbox bench …` (also `python -m bench …`): run, sweep and compare against OpenAI-compatible servers."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.arrivals import ArrivalProcess, Schedule
from bench.client import ClientConfig, Endpoint, RequestOutcome, first_model_id
from bench.compare import DEFAULT_LAUNCH, CompareConfig, LaunchConfig, run_compare
from bench.metrics import AbsoluteSLO, IsolatedBaseline, PromptBuckets, RelativeSLO, SLOPolicy
from bench.run import build_result, measure_isolated, run_meta, run_requests, write_json
from bench.sweep import isolated_seed, parse_rates, point_seed, run_sweep, sweep_summary
from bench.workloads import WORKLOADS, PromptBuilder, RequestSource, TextCodec, load_codec, warmup_requests

T = TypeVar("T")


@dataclass(frozen=True)
class BenchContext:
    """What the commands take from outside: how to load a tokenizer (tests pass a stand-in)."""

    load_codec: Callable[[str | None], TextCodec] = load_codec


def _context() -> BenchContext:
    found = click.get_current_context().find_object(BenchContext)
    return found if found is not None else BenchContext()


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad values surface as ValueError with an actionable sentence; show it as a usage error."""
    try:
        yield
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; a server that cannot be reached or fails warm-up is a plain error."""
    try:
        return asyncio.run(coro)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
    )


class _Tracker:
    """Feeds finished requests into one rich progress task, re-labelled per phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None, failed=0)
        self.failed = 0

    def phase(self, description: str, total: int) -> None:
        self.failed = 0
        self.progress.reset(self.task, description=description, total=total, failed=0)

    def done(self, outcome: RequestOutcome) -> None:
        self.failed += not outcome.success
        self.progress.update(self.task, advance=1, failed=self.failed)


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


def _sweep_table(summary: Mapping[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("rate", "req/s", "goodput", "attain %", "p50 TTFT", "p99 TTFT", "p50 TPOT", "p99 TPOT", "failed"):
        table.add_column(col, justify="right")
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
    for p in summary["points"]:
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


# -- shared options ------------------------------------------------------------------------------


def _workload_options(f: Callable[..., Any], default_workload: str = "chat") -> Callable[..., Any]:
    options = [
        click.option(
            "--workload",
            type=click.Choice(sorted(WORKLOADS)),
            default=default_workload,
            show_default=True,
            help="Synthetic workload (see bench/workloads.py for the length ranges).",
        ),
        click.option(
            "--dataset",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="ShareGPT-format JSON file; replaces --workload.",
        ),
        click.option("--num-requests", type=int, default=100, show_default=True, help="Requests per run."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--shared-prefix",
            type=int,
            default=0,
            show_default=True,
            help="Prepend one common system-prompt-like block of N tokens to every prompt.",
        ),
        click.option(
            "--tokenizer",
            "tokenizer_path",
            type=click.Path(exists=True, dir_okay=False),
            help="GGUF whose tokenizer measures lengths [default: pdbox's embedded model].",
        ),
        click.option("--endpoint", type=click.Choice(["chat", "completions"]), default="chat", show_default=True),
        click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True),
        click.option("--timeout-s", type=float, default=600.0, show_default=True, help="Per-request timeout."),
        click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up requests."),
        click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer token [env: OPENAI_API_KEY]."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def _slo_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--slo-ttft-ms", type=float, help="Absolute TTFT SLO (ms)."),
        click.option("--slo-tpot-ms", type=float, help="Absolute TPOT SLO (ms)."),
        click.option(
            "--k-ttft",
            type=float,
            default=4.0,
            show_default=True,
            help="Relative SLO: TTFT <= k x isolated TTFT + 0.5 s.",
        ),
        click.option(
            "--k-tpot", type=float, default=1.5, show_default=True, help="Relative SLO: TPOT <= k x isolated TPOT."
        ),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(options), f)


def _absolute_slo(slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> AbsoluteSLO | None:
    if slo_ttft_ms is None and slo_tpot_ms is None:
        return None
    return AbsoluteSLO(
        slo_ttft_ms if slo_ttft_ms is not None else math.inf, slo_tpot_ms if slo_tpot_ms is not None else math.inf
    )


def _builder(tokenizer_path: str | None, shared_prefix: int) -> PromptBuilder:
    return PromptBuilder(_context().load_codec(tokenizer_path), shared_prefix_len=shared_prefix)


async def _client_config(
    url: str, model: str | None, endpoint: str, timeout_s: float, api_key: str | None
) -> ClientConfig:
    model = model or await first_model_id(url, api_key=api_key)
    return ClientConfig(url, model, cast(Endpoint, endpoint), timeout_s, api_key)


@click.group(name="bench")
def bench() -> None:
    """Benchmark OpenAI-compatible servers (pdbox, vLLM, SGLang): TTFT, TPOT, ITL, goodput."""


@bench.command("run")
@click.option("--url", required=True, help="Server root, e.g. http://127.0.0.1:8000.")
@click.option("--model", help="Model name [default: the first id of GET /v1/models].")
@click.option("--rate", type=float, help="Open-loop arrival rate (req/s).")
@click.option("--concurrency", type=int, help="Closed loop with C requests in flight (with --rate: a cap).")
@click.option(
    "--baseline",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="isolated.json (from sweep/compare) for relative SLOs.",
)
@_slo_options
@_workload_options
def run_cmd(
    url: str,
    model: str | None,
    rate: float | None,
    concurrency: int | None,
    baseline: Path | None,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
    k_ttft: float,
    k_tpot: float,
    workload: str,
    dataset: Path | None,
    num_requests: int,
    seed: int,
    shared_prefix: int,
    tokenizer_path: str | None,
    endpoint: str,
    arrival: str,
    timeout_s: float,
    warmup: int,
    api_key: str | None,
    out_dir: Path,
) -> None:
    """One run at a fixed rate or concurrency; writes OUT/result.json (vLLM --save-result keys)."""
    console = Console()
    with _user_errors():
        schedule = Schedule(rate if rate is not None else math.inf, concurrency, cast(ArrivalProcess, arrival), seed)
        slo: SLOPolicy | None = _absolute_slo(slo_ttft_ms, slo_tpot_ms)
        if slo is None and baseline is not None:
            base = IsolatedBaseline.from_dict(json.loads(baseline.read_text())["baseline"])
            slo = RelativeSLO(base, k_ttft, k_tpot)
        source = RequestSource(workload, num_requests, dataset)
        builder = _builder(tokenizer_path, shared_prefix)
        requests = source.make(builder, seed)

    async def go() -> dict[str, Any]:
        config = await _client_config(url, model, endpoint, timeout_s, api_key)
        with _progress(Console(stderr=True)) as progress:
            tracker = _Tracker(progress)
            tracker.phase(f"{source.label} -> {config.url}", len(requests))
            run = await run_requests(config, requests, schedule, warmup_requests(builder, warmup), tracker.done)
        extra = {
            "num_prompts": len(requests),
            "shared_prefix_len": builder.prefix_len,
            "tokenizer_id": builder.codec.name,
        }
        return build_result(run, slo, run_meta(config, schedule, source.label, seed, extra))

    result = _run_async(go())
    path = write_json(out_dir / "result.json", result)
    console.print(summary_table(result))
    console.print(f"wrote {path}")


@bench.command("sweep")
@click.option("--url", required=True, help="Server root, e.g. http://127.0.0.1:8000.")
@click.option("--model", help="Model name [default: the first id of GET /v1/models].")
@click.option("--rates", default="0.5,1,2,4", show_default=True, help="Comma-separated offered rates (req/s).")
@click.option(
    "--baseline",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="isolated.json to reuse instead of measuring the isolated baseline on this server.",
)
@click.option(
    "--isolated-per-bucket",
    type=int,
    default=3,
    show_default=True,
    help="Isolated requests per prompt-length bucket for the relative SLO baseline.",
)
@_slo_options
@_workload_options
def sweep_cmd(
    url: str,
    model: str | None,
    rates: str,
    baseline: Path | None,
    isolated_per_bucket: int,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
    k_ttft: float,
    k_tpot: float,
    workload: str,
    dataset: Path | None,
    num_requests: int,
    seed: int,
    shared_prefix: int,
    tokenizer_path: str | None,
    endpoint: str,
    arrival: str,
    timeout_s: float,
    warmup: int,
    api_key: str | None,
    out_dir: Path,
) -> None:
    """A rate sweep; goodput = the highest rate with >= 90% SLO attainment. Writes OUT/sweep.json.

    Without --slo-ttft-ms/--slo-tpot-ms the SLO is relative to an isolated baseline, read from
    --baseline or measured first on this server (one request at a time) and saved as OUT/isolated.json.
    """
    console = Console()
    with _user_errors():
        rate_list = parse_rates(rates)
        source = RequestSource(workload, num_requests, dataset)
        builder = _builder(tokenizer_path, shared_prefix)
        absolute = _absolute_slo(slo_ttft_ms, slo_tpot_ms)

    async def go() -> dict[str, Any]:
        config = await _client_config(url, model, endpoint, timeout_s, api_key)
        warm = warmup_requests(builder, warmup)
        with _progress(Console(stderr=True)) as progress:
            tracker = _Tracker(progress)
            slo: SLOPolicy | None = absolute
            if slo is None:
                if baseline is not None:
                    base = IsolatedBaseline.from_dict(json.loads(baseline.read_text())["baseline"])
                else:
                    base, isolated = await measure_isolated(
                        config,
                        builder,
                        source.make(builder, point_seed(seed, 0)),
                        isolated_seed(seed),
                        PromptBuckets(),
                        isolated_per_bucket,
                        warmup=warm,
                        on_start=lambda n: tracker.phase("isolated baseline", n),
                        on_done=tracker.done,
                    )
                    write_json(out_dir / "isolated.json", isolated)
                    warm = []
                slo = RelativeSLO(base, k_ttft, k_tpot)
            points = await run_sweep(
                config,
                source,
                builder,
                rate_list,
                seed,
                slo,
                cast(ArrivalProcess, arrival),
                warm,
                out_dir,
                on_point=lambda r, n: tracker.phase(f"rate {r:g} req/s", n),
                on_done=tracker.done,
            )
        return {
            "model_id": config.model,
            "base_url": config.base_url,
            "workload": source.label,
            "seed": seed,
            **sweep_summary(points, slo),
        }

    summary = _run_async(go())
    path = write_json(out_dir / "sweep.json", summary, indent=2)
    console.print(_sweep_table(summary, f"{summary['workload']} sweep against {url}"))
    console.print(f"goodput: {summary['goodput']:g} req/s (highest rate with >= 90% SLO attainment)")
    console.print(f"wrote {path}")


@bench.command("compare")
@click.option("--rates", default="0.5,1,2,4", show_default=True, help="Comma-separated offered rates (req/s).")
@click.option(
    "--modes",
    default="unified,disagg",
    show_default=True,
    help="Modes to launch, one after the other; the first gives the isolated baseline.",
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
@click.option(
    "--isolated-per-bucket",
    type=int,
    default=3,
    show_default=True,
    help="Isolated requests per prompt-length bucket for the relative SLO baseline.",
)
@_slo_options
@functools.partial(_workload_options, default_workload="mixed")
def compare_cmd(
    rates: str,
    modes: str,
    launch: str,
    host: str,
    ready_timeout_s: float,
    stop_timeout_s: float,
    peer_url: str | None,
    peer_name: str,
    isolated_per_bucket: int,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
    k_ttft: float,
    k_tpot: float,
    workload: str,
    dataset: Path | None,
    num_requests: int,
    seed: int,
    shared_prefix: int,
    tokenizer_path: str | None,
    endpoint: str,
    arrival: str,
    timeout_s: float,
    warmup: int,
    api_key: str | None,
    out_dir: Path,
) -> None:
    """Unified vs disaggregated on the same devices: OUT/report.md, OUT/compare.json and PNG plots.

    Each mode is launched in turn (--launch), swept over the same seeded requests, and stopped with
    SIGTERM before the next starts. The default SLO is relative to the isolated baseline measured on the
    first mode; the SLO map scores every mode over k_ttft in {2,4,8} x k_tpot in {1.25,1.5,2,3}.
    """
    console = Console()
    with _user_errors():
        config = CompareConfig(
            source=RequestSource(workload, num_requests, dataset),
            rates=parse_rates(rates),
            out_dir=out_dir,
            modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
            seed=seed,
            launch=LaunchConfig(launch, host, ready_timeout_s, stop_timeout_s),
            endpoint=cast(Endpoint, endpoint),
            timeout_s=timeout_s,
            peer_url=peer_url,
            peer_name=peer_name,
            api_key=api_key,
            absolute_slo=_absolute_slo(slo_ttft_ms, slo_tpot_ms),
            k_ttft=k_ttft,
            k_tpot=k_tpot,
            isolated_per_bucket=isolated_per_bucket,
            process=cast(ArrivalProcess, arrival),
            warmup=warmup,
        )
        builder = _builder(tokenizer_path, shared_prefix)

    async def go() -> dict[str, Any]:
        with _progress(Console(stderr=True)) as progress:
            tracker = _Tracker(progress)
            summary, _ = await run_compare(config, builder, tracker.phase, tracker.done)
            return summary

    summary = _run_async(go())
    write_json(out_dir / "compare.json", summary, indent=2)
    from bench.report import write_report  # NOTE: lazy: matplotlib is slow to import

    report = write_report(out_dir, summary)
    for name, mode in summary["modes"].items():
        console.print(_sweep_table({"points": mode["sweep"]}, f"{name} ({mode['url']})"))
    console.print(f"[bold]Verdict:[/bold] {summary['verdict']}")
    console.print(f"wrote {report} and {out_dir / 'compare.json'}")


@bench.command("report")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_cmd(out_dir: Path) -> None:
    """Redraw OUT_DIR/report.md and its plots from the compare.json and rate files already there."""
    from bench.report import write_report

    with _user_errors():
        summary = json.loads((out_dir / "compare.json").read_text())
    click.echo(f"wrote {write_report(out_dir, summary)}")


def main() -> None:
    bench(prog_name="python -m bench")

"""`pdbox bench …` (also `python -m bench …`): run, sweep and compare against OpenAI-compatible servers."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.arrivals import ArrivalProcess, Schedule
from bench.client import ClientConfig, Endpoint, RequestOutcome, first_model_id
from bench.compare import DEFAULT_LAUNCH, CompareConfig, LaunchConfig, run_compare
from bench.metrics import AbsoluteSLO, IsolatedBaseline, PromptBuckets, RelativeSLO, SLOPolicy
from bench.peer import PeerConfig, Target, run_peer
from bench.peer_report import peer_table, write_peer_report
from bench.peer_workloads import PEER_WORKLOADS, parse_workloads
from bench.random_prompts import RandomTokenPrompts
from bench.report import summary_table, sweep_table, write_report
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


# -- shared options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """The options every command shares: what to send, how, and where results go."""

    workload: str
    dataset: Path | None
    num_requests: int
    seed: int
    shared_prefix: int
    tokenizer_path: str | None
    endpoint: str
    arrival: str
    timeout_s: float
    warmup: int
    api_key: str | None
    out_dir: Path

    @property
    def source(self) -> RequestSource:
        return RequestSource(self.workload, self.num_requests, self.dataset)

    @property
    def process(self) -> ArrivalProcess:
        return cast(ArrivalProcess, self.arrival)

    def builder(self) -> PromptBuilder:
        return PromptBuilder(_context().load_codec(self.tokenizer_path), shared_prefix_len=self.shared_prefix)

    async def client(self, url: str, model: str | None) -> ClientConfig:
        model = model or await first_model_id(url, api_key=self.api_key)
        return ClientConfig(url, model, cast(Endpoint, self.endpoint), self.timeout_s, self.api_key)


@dataclass(frozen=True)
class SLOOptions:
    """The SLO options: absolute limits when either is given, else the relative scales."""

    slo_ttft_ms: float | None
    slo_tpot_ms: float | None
    k_ttft: float
    k_tpot: float

    def absolute(self) -> AbsoluteSLO | None:
        if self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            return None
        unset = lambda ms: math.inf if ms is None else ms
        return AbsoluteSLO(unset(self.slo_ttft_ms), unset(self.slo_tpot_ms))

    def relative(self, baseline: IsolatedBaseline) -> RelativeSLO:
        return RelativeSLO(baseline, self.k_ttft, self.k_tpot)


_LOAD_OPTIONS = [
    click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="ShareGPT-format JSON file; replaces --workload."),
    click.option("--num-requests", type=int, default=100, show_default=True, help="Requests per run (per rate)."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--shared-prefix", type=int, default=0, show_default=True,
                 help="Prepend one common system-prompt-like block of N tokens to every prompt."),
    click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
                 help="GGUF whose tokenizer measures lengths [default: pdbox's embedded model]."),
    click.option("--endpoint", type=click.Choice(["chat", "completions"]), default="chat", show_default=True),
    click.option("--arrival", type=click.Choice(["poisson", "constant"]), default="poisson", show_default=True),
    click.option("--timeout-s", type=float, default=600.0, show_default=True, help="Per-request timeout."),
    click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up requests."),
    click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer token [env: OPENAI_API_KEY]."),
    click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True),
]

_SLO_OPTIONS = [
    click.option("--slo-ttft-ms", type=float, help="Absolute TTFT SLO (ms)."),
    click.option("--slo-tpot-ms", type=float, help="Absolute TPOT SLO (ms)."),
    click.option("--k-ttft", type=float, default=4.0, show_default=True,
                 help="Relative SLO: TTFT <= k x isolated TTFT + 0.5 s."),
    click.option("--k-tpot", type=float, default=1.5, show_default=True,
                 help="Relative SLO: TPOT <= k x isolated TPOT."),
]


def _packed(cls: type, options: list[Callable[..., Any]], name: str) -> Callable[[Callable[..., Any]], Any]:
    """Add `options` to a command and hand their values to it as one `cls` instance named `name`."""
    fields = [f.name for f in dataclasses.fields(cls)]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            packed = cls(**{f: kwargs.pop(f) for f in fields})
            return command(**kwargs, **{name: packed})

        return functools.reduce(lambda acc, option: option(acc), reversed(options), wrapper)

    return decorate


def load_options(default_workload: str) -> Callable[[Callable[..., Any]], Any]:
    """The shared options, packed into `load: LoadOptions`; `--workload` defaults per command."""
    workload = click.option(
        "--workload",
        type=click.Choice(sorted(WORKLOADS)),
        default=default_workload,
        show_default=True,
        help="Synthetic workload (length ranges: bench/workloads.py).",
    )
    return _packed(LoadOptions, [workload, *_LOAD_OPTIONS], "load")


slo_options = _packed(SLOOptions, _SLO_OPTIONS, "slo_opts")
url_option = click.option("--url", required=True, help="Server root, e.g. http://127.0.0.1:8000.")
model_option = click.option("--model", help="Model name [default: the first id of GET /v1/models].")
rates_option = click.option("--rates", default="0.5,1,2,4", show_default=True, help="Offered rates (req/s), a,b,c.")
isolated_option = click.option("--isolated-per-bucket", type=int, default=3, show_default=True,
                               help="Isolated requests per prompt-length bucket (relative SLO baseline).")


def _read_baseline(path: Path) -> IsolatedBaseline:
    return IsolatedBaseline.from_dict(json.loads(path.read_text())["baseline"])


# -- commands ------------------------------------------------------------------------------------


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
    with _user_errors():
        schedule = Schedule(rate if rate is not None else math.inf, concurrency, load.process, load.seed)
        slo: SLOPolicy | None = slo_opts.absolute()
        if slo is None and baseline is not None:
            slo = slo_opts.relative(_read_baseline(baseline))
        builder = load.builder()
        requests = load.source.make(builder, load.seed)

    async def go() -> dict[str, Any]:
        config = await load.client(url, model)
        with _progress(Console(stderr=True)) as progress:
            tracker = _Tracker(progress)
            tracker.phase(f"{load.source.label} -> {config.url}", len(requests))
            warm = warmup_requests(builder, load.warmup)
            run = await run_requests(config, requests, schedule, warm, tracker.done)
        extra = {"num_prompts": len(requests), "shared_prefix_len": builder.prefix_len,
                 "tokenizer_id": builder.codec.name}
        return build_result(run, slo, run_meta(config, schedule, load.source.label, load.seed, extra))

    result = _run_async(go())
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
    with _user_errors():
        rate_list = parse_rates(rates)
        source = load.source
        builder = load.builder()

    async def go() -> dict[str, Any]:
        config = await load.client(url, model)
        warm = warmup_requests(builder, load.warmup)
        with _progress(Console(stderr=True)) as progress:
            tracker = _Tracker(progress)
            slo: SLOPolicy | None = slo_opts.absolute()
            if slo is None and baseline is not None:
                slo = slo_opts.relative(_read_baseline(baseline))
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

    summary = _run_async(go())
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
    with _user_errors():
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
        with _progress(Console(stderr=True)) as progress:
            tracker = _Tracker(progress)
            summary, _ = await run_compare(config, builder, tracker.phase, tracker.done)
            return summary

    summary = _run_async(go())
    write_json(load.out_dir / "compare.json", summary, indent=2)
    report = write_report(load.out_dir, summary)
    console = Console()
    for name, mode in summary["modes"].items():
        console.print(sweep_table(mode["sweep"], f"{name} ({mode['url']})"))
    console.print(f"[bold]Verdict:[/bold] {summary['verdict']}")
    console.print(f"wrote {report} and {load.out_dir / 'compare.json'}")


@bench.command("peer")
@click.option("--url", required=True, help="The peer: any OpenAI-compatible server (vLLM, SGLang, llama.cpp).")
@click.option("--pdbox-url", help="A running pdbox (`pdbox up` prints it), e.g. http://127.0.0.1:8000.")
@click.option("--model", help="The peer's model name [default: the first id of its GET /v1/models].")
@click.option("--pdbox-model", help="pdbox's model name [default: the first id of its GET /v1/models].")
@click.option("--peer-name", help="The peer's name in the report [default: owned_by of its /v1/models].")
@click.option("--workloads", default=",".join(PEER_WORKLOADS), show_default=True,
              help="Comma-separated subset of the fixed workloads.")
@click.option("--num-requests", type=int, help="Requests per workload [default: each workload's own].")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Shrink every workload for smoke tests: x requests and prompt tokens, arrivals 1/x as far apart.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, dir_okay=False),
              help="GGUF whose tokenizer makes the prompts [default: pdbox's embedded model].")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed warm-up requests per server.")
@click.option("--timeout-s", type=float, default=600.0, show_default=True, help="Per-request timeout.")
@click.option("--probe-timeout-s", type=float, default=30.0, show_default=True,
              help="How long each server gets to answer GET /v1/models before it counts as unreachable.")
@click.option("--api-key", envvar="OPENAI_API_KEY", help="Bearer token for both servers [env: OPENAI_API_KEY].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def peer_cmd(url: str, pdbox_url: str | None, model: str | None, pdbox_model: str | None, peer_name: str | None,
             workloads: str, num_requests: int | None, scale: float, seed: int, tokenizer_path: str | None,
             warmup: int, timeout_s: float, probe_timeout_s: float, api_key: str | None, out_dir: Path) -> None:
    """The same fixed workloads against a peer server and against pdbox: OUT/peer-report.md and .json.

    Workloads (as `vllm bench serve --backend openai-chat --dataset-name random --random-range-ratio 0
    --ignore-eos` sends them): chat 256 in / 64 out, 48 at once; the same at 1 and 2 req/s (Poisson);
    RAG 1536 in / 32 out at 0.3 req/s. Same prompts for both; the peer runs first, then pdbox.
    """
    with _user_errors():
        if pdbox_url is None:
            raise ValueError("--pdbox-url is needed: start pdbox first (`pdbox up`, which prints "
                             "`ready: http://HOST:PORT`) and pass that URL")
        config = PeerConfig(
            peer=Target("peer", url, model, peer_name), pdbox=Target("pdbox", pdbox_url, pdbox_model),
            workloads=tuple(w.sized(scale, num_requests) for w in parse_workloads(workloads)), out_dir=out_dir,
            seed=seed, scale=scale, num_requests=num_requests, warmup=warmup, timeout_s=timeout_s,
            probe_timeout_s=probe_timeout_s, api_key=api_key,
        )
        prompts = RandomTokenPrompts(_context().load_codec(tokenizer_path))

    async def go() -> dict[str, Any]:
        with _progress(Console(stderr=True)) as progress:
            tracker = _Tracker(progress)
            return await run_peer(config, prompts, tracker.phase, tracker.done)

    summary = _run_async(go())
    md, js = write_peer_report(out_dir, summary)
    console = Console()
    console.print(peer_table(summary))
    console.print(f"wrote {md} and {js}")


@bench.command("report")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report_cmd(out_dir: Path) -> None:
    """Redraw OUT_DIR/report.md and its plots from the compare.json and rate files already there."""
    with _user_errors():
        summary = json.loads((out_dir / "compare.json").read_text())
    click.echo(f"wrote {write_report(out_dir, summary)}")


def main() -> None:
    bench(prog_name="python -m bench")

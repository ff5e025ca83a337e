"""`bench compare`: each serving mode on the same devices, one after the other, same requests and seeds.

Order of work:
1. start the first mode (unified by default) and measure the isolated baseline on it: requests of each
   prompt-length bucket the sweep uses, sent one at a time, give the isolated TTFT per bucket and TPOT;
2. sweep every rate against that server, stop it (SIGTERM), start the next mode, sweep, stop, ...;
   or, with ``interleave``, rate by rate: every mode on a fresh server for each rate point, so the
   slow drift of a shared machine lands on every mode alike;
3. sweep an already-running peer (`--peer-url`, e.g. vLLM) if given;
4. score every mode with the same SLO, write compare.json, then report.md and the plots.

The reference rate, where per-mode latencies are quoted, is the rate at which the first mode's
request goodput (requests/s meeting the SLO) peaks.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.arrivals import ArrivalProcess
from bench.client import ClientConfig, Endpoint, first_model_id
from bench.metrics import (
    DEFAULT_ATTAINMENT_TARGET,
    AbsoluteSLO,
    IsolatedBaseline,
    PromptBuckets,
    RelativeSLO,
    SLOPolicy,
    slo_grid_goodput,
)
from bench.run import OnDone, measure_isolated, write_json
from bench.server_state import delta, placement
from bench.sweep import SweepPoint, isolated_seed, point_seed, run_sweep, sweep_summary
from bench.workloads import BenchRequest, PromptBuilder, RequestSource, warmup_requests

# NOTE: the running interpreter, so a compare works from a venv that is not on PATH.
DEFAULT_LAUNCH = f"{shlex.quote(sys.executable)} -m appliance.cli up --mode {{mode}} --host {{host}} --port {{port}}"
READY_PATTERN = re.compile(r"ready:\s*(https?://\S+)")
REFERENCE_FIELDS = (
    "p50_ttft_ms",
    "p99_ttft_ms",
    "p50_tpot_ms",
    "p99_tpot_ms",
    "p50_itl_ms",
    "p99_itl_ms",
    "p99_e2el_ms",
    "request_throughput",
    "request_goodput",
    "slo_attainment",
)

OnPhase = Callable[[str, int], None]


def free_port(host: str) -> int:
    """A port the OS reports free right now (another process could still take it before the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LaunchConfig:
    """How to start a mode: a command template with {mode}, {host} and {port}, split like a shell would."""

    template: str = DEFAULT_LAUNCH
    host: str = "127.0.0.1"
    ready_timeout_s: float = 900.0
    stop_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.command("unified", 1)  # NOTE: fail at parse time on an unknown placeholder

    def command(self, mode: str, port: int) -> list[str]:
        """The argv serving ``mode``; ``NAME@N`` serves NAME with ``--cores-per-engine N`` appended."""
        base, _, cores = mode.partition("@")
        if cores and not cores.isdigit():
            raise ValueError(f"mode {mode!r}: write NAME@N with N the cores of each engine, e.g. unified@2")
        try:
            argv = [p.format(mode=base, host=self.host, port=port) for p in shlex.split(self.template)]
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"--launch may use only {{mode}}, {{host}} and {{port}}: {self.template!r}") from exc
        return argv + ["--cores-per-engine", cores] if cores else argv


class LaunchedServer:
    """A serving mode started as a subprocess in its own session; `async with` yields its URL.

    Startup waits for the `ready: http://HOST:PORT` line on stdout (everything it prints goes to
    `log_path`). Exit sends SIGTERM and waits `stop_timeout_s`; whatever is left of the process group
    after that is killed, so the next mode finds the devices free.
    """

    def __init__(self, launch: LaunchConfig, mode: str, log_path: Path) -> None:
        self.launch = launch
        self.mode = mode
        self.log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[str] | None = None

    async def __aenter__(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.launch.command(self.mode, free_port(self.launch.host))
        self._log = self.log_path.open("ab")
        self._log.write(f"$ {shlex.join(command)}\n".encode())
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=self._log, start_new_session=True
            )
        except OSError as exc:
            self._log.close()
            raise RuntimeError(f"cannot start {self.mode!r} with {shlex.join(command)}: {exc}") from exc
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._ready = ready
        self._pump = asyncio.create_task(self._read_stdout(self._proc, self._log, ready))
        try:
            return await asyncio.wait_for(asyncio.shield(ready), self.launch.ready_timeout_s)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, asyncio.TimeoutError):
                raise RuntimeError(
                    f"{self.mode!r} printed no ready line in {self.launch.ready_timeout_s:g} s; see {self.log_path}"
                ) from exc
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _read_stdout(self, proc: asyncio.subprocess.Process, log: IO[bytes], ready: asyncio.Future[str]) -> None:
        # NOTE: stdout is drained for the server's whole life, or a full pipe would stall it.
        if proc.stdout is not None:
            async for line in proc.stdout:
                log.write(line)
                log.flush()
                match = READY_PATTERN.search(line.decode("utf-8", errors="replace"))
                if match and not ready.done():
                    ready.set_result(match.group(1).rstrip("/"))
        code = await proc.wait()
        if not ready.done():
            ready.set_exception(
                RuntimeError(f"{self.mode!r} exited with code {code} before it was ready; see {self.log_path}")
            )

    async def stop(self) -> None:
        """SIGTERM, a grace period, then SIGKILL to whatever is left of the process group. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.launch.stop_timeout_s)
            except asyncio.TimeoutError:
                pass
        _kill_group(proc.pid)  # NOTE: the session we created; a clean stop leaves nothing in it
        await proc.wait()
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._pump, 5.0)
            except asyncio.TimeoutError:
                self._pump.cancel()
        if self._ready is not None and self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # NOTE: marks a startup failure as seen; it was raised or superseded
        if self._log is not None:
            self._log.close()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class CompareConfig:
    """Everything one comparison needs; the same requests, seeds and SLO apply to every mode."""

    source: RequestSource
    rates: tuple[float, ...]
    out_dir: Path
    modes: tuple[str, ...] = ("unified", "disagg")
    seed: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    endpoint: Endpoint = "chat"
    timeout_s: float = 600.0
    peer_url: str | None = None
    peer_name: str = "peer"
    api_key: str | None = None
    absolute_slo: AbsoluteSLO | None = None
    k_ttft: float = 4.0
    k_tpot: float = 1.5
    ttft_slack_s: float = 0.5
    k_ttft_grid: tuple[float, ...] = (2.0, 4.0, 8.0)
    k_tpot_grid: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0)
    target: float = DEFAULT_ATTAINMENT_TARGET
    isolated_per_bucket: int = 3
    isolated_max_output_len: int = 32
    interleave: bool = False  # rate by rate, each mode on a fresh server per point (else mode by mode)
    process: ArrivalProcess = "poisson"
    warmup: int = 2
    buckets: PromptBuckets = field(default_factory=PromptBuckets)

    def __post_init__(self) -> None:
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"--modes needs distinct mode names, got {','.join(self.modes)!r}")
        if self.peer_url is not None and self.peer_name in self.modes:
            raise ValueError(f"--peer-name {self.peer_name!r} clashes with a launched mode")
        if not self.rates:
            raise ValueError("--rates needs at least one rate")

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.modes, self.peer_name) if self.peer_url else self.modes


@dataclass(frozen=True)
class ModeRun:
    """One mode's sweep: where it ran and each rate point."""

    name: str
    url: str
    model: str
    points: tuple[SweepPoint, ...]


async def run_compare(
    config: CompareConfig, builder: PromptBuilder, on_phase: OnPhase | None = None, on_done: OnDone | None = None
) -> tuple[dict[str, Any], dict[str, ModeRun]]:
    """Run every mode (and the peer); return compare.json's content and the raw runs."""
    out = config.out_dir
    baseline: IsolatedBaseline | None = None
    points: dict[str, list[SweepPoint]] = {m: [] for m in config.names}
    where: dict[str, tuple[str, str]] = {}
    phase = on_phase or (lambda text, total: None)
    rounds = [(i, (r,)) for i, r in enumerate(config.rates)] if config.interleave else [(0, config.rates)]
    for first, rates in rounds:
        for mode in config.names:
            log = f"server_rate_{rates[0]:g}.log" if config.interleave else "server.log"
            async with _ModeServer(config, mode, out / mode / log) as url:
                model = await first_model_id(url, api_key=config.api_key)
                client = ClientConfig(url, model, config.endpoint, config.timeout_s, config.api_key)
                warm = warmup_requests(builder, config.warmup)
                if baseline is None:  # the first server of the run measures it (and is warmed by it)
                    baseline = await _isolated_baseline(config, builder, client, mode, warm, phase, on_done)
                    warm = []
                slo = default_slo(config, baseline)
                points[mode] += await run_sweep(
                    client,
                    config.source,
                    builder,
                    rates,
                    config.seed,
                    slo,
                    config.process,
                    warm,
                    out / mode,
                    {"mode": mode},
                    lambda rate, n, m=mode: phase(f"{m}: {rate:g} req/s", n),
                    on_done,
                    _PlacementDelta(url, config.api_key),
                    first_index=first,
                )
                summary = sweep_summary(points[mode], slo, config.target)
                write_json(out / mode / "sweep.json", {"mode": mode, **summary}, 2)
                where[mode] = (url, client.model)
    if baseline is None:
        raise RuntimeError("no mode ran, so there is no isolated baseline")
    runs = {m: ModeRun(m, where[m][0], where[m][1], tuple(points[m])) for m in config.names}
    return summarize(config, baseline, runs), runs


async def _isolated_baseline(config: CompareConfig, builder: PromptBuilder, client: ClientConfig, mode: str,
                             warm: Sequence[BenchRequest], phase: OnPhase, on_done: OnDone | None
                             ) -> IsolatedBaseline:
    """Measure the isolated baseline on ``mode``'s server and write isolated.json."""
    baseline, isolated = await measure_isolated(
        client,
        builder,
        config.source.make(builder, point_seed(config.seed, 0)),
        isolated_seed(config.seed),
        config.buckets,
        config.isolated_per_bucket,
        config.isolated_max_output_len,
        warm,
        lambda n: phase(f"{mode}: isolated baseline", n),
        on_done,
    )
    write_json(config.out_dir / "isolated.json", {"mode": mode, **isolated})
    return baseline


class _PlacementDelta:
    """After each rate point: the server's placement counters for that point alone (None if it keeps none)."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url, self.api_key = url, api_key
        self.last: dict[str, Any] | None = None

    async def __call__(self) -> dict[str, Any] | None:
        now = await placement(self.url, self.api_key)
        point, self.last = delta(now, self.last), now
        return point


class _ModeServer:
    """Launch a mode, or pass an already-running peer's URL through untouched."""

    def __init__(self, config: CompareConfig, mode: str, log: Path) -> None:
        launched = mode in config.modes
        self.server = LaunchedServer(config.launch, mode, log) if launched else None
        self.url = config.peer_url or ""

    async def __aenter__(self) -> str:
        return await self.server.__aenter__() if self.server is not None else self.url

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            await self.server.stop()


def default_slo(config: CompareConfig, baseline: IsolatedBaseline) -> SLOPolicy:
    """The SLO every mode is scored by: the absolute one when given, else relative to the baseline."""
    if config.absolute_slo is not None:
        return config.absolute_slo
    return RelativeSLO(baseline, config.k_ttft, config.k_tpot, config.ttft_slack_s)


def reference_rate(points: Sequence[SweepPoint]) -> float:
    """The rate where request goodput peaks (the lowest such rate on a tie)."""
    return max(points, key=lambda p: (p.result["request_goodput"] or 0.0, -p.rate)).rate


def summarize(config: CompareConfig, baseline: IsolatedBaseline, runs: Mapping[str, ModeRun]) -> dict[str, Any]:
    """compare.json: per-mode goodput and latencies at the reference rate, the SLO, and the SLO map."""
    from bench.report import verdict

    slo = default_slo(config, baseline)
    ref_rate = reference_rate(runs[config.modes[0]].points)
    modes: dict[str, Any] = {}
    for name, run in runs.items():
        sweep = sweep_summary(run.points, slo, config.target)
        at_ref = next(p for p in run.points if p.rate == ref_rate)
        modes[name] = {
            "url": run.url,
            "model": run.model,
            "goodput": sweep["goodput"],
            "rate": ref_rate,
            **{k: at_ref.result.get(k) for k in REFERENCE_FIELDS},
            "sweep": sweep["points"],
            "placement": [{"rate": p.rate, **p.result["server"]} for p in run.points if p.result.get("server")],
        }
    slo_map = {
        "k_ttft": list(config.k_ttft_grid),
        "k_tpot": list(config.k_tpot_grid),
        "ttft_slack_s": config.ttft_slack_s,
        "goodput": {
            name: slo_grid_goodput(
                [(p.rate, p.outcomes) for p in run.points],
                baseline,
                config.k_ttft_grid,
                config.k_tpot_grid,
                config.ttft_slack_s,
                config.target,
            )
            for name, run in runs.items()
        },
    }
    summary = {
        "workload": config.source.label,
        "num_requests": config.source.num_requests,
        "seed": config.seed,
        "rates": list(config.rates),
        "endpoint": config.endpoint,
        "arrival": config.process,
        "order": "interleaved" if config.interleave else "by-mode",
        "launch": config.launch.template,
        "reference_mode": config.modes[0],
        "reference_rate": ref_rate,
        "modes": modes,
        "slo": {**slo.describe(), "attainment_target": config.target, "isolated": baseline.to_dict()},
        "slo_map": slo_map,
    }
    summary["verdict"] = verdict(summary)
    return summary

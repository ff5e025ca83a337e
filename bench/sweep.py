"""A rate sweep: the same workload at each offered rate, and the goodput it implies.

Each rate point draws fresh prompts from its own seed, `point_seed(seed, index)`, so a later point
never hits the prefix cache that an earlier point filled; two sweeps with the same seed and rate list
(for example one per serving mode) send identical requests at identical times.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.arrivals import ArrivalProcess, Schedule
from bench.client import ClientConfig, RequestOutcome
from bench.metrics import DEFAULT_ATTAINMENT_TARGET, SLOPolicy, goodput_rate
from bench.run import OnDone, build_result, run_meta, run_requests, write_json
from bench.workloads import BenchRequest, PromptBuilder, RequestSource

# The summary fields copied from each point's result.json into sweep.json.
POINT_FIELDS = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "request_goodput",
    "slo_attainment",
    "output_throughput",
    "mean_ttft_ms",
    "p50_ttft_ms",
    "p90_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "p50_tpot_ms",
    "p90_tpot_ms",
    "p99_tpot_ms",
    "p50_itl_ms",
    "p99_itl_ms",
    "p50_e2el_ms",
    "p99_e2el_ms",
)


def parse_rates(text: str) -> tuple[float, ...]:
    """'0.5,1,2' -> (0.5, 1.0, 2.0); rates must be positive, finite and distinct."""
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"--rates takes comma-separated numbers like 0.5,1,2, got {text!r}") from exc
    if not rates or any(not 0 < r < float("inf") for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"--rates needs distinct positive finite rates, got {text!r}")
    return tuple(sorted(rates))


def point_seed(seed: int, index: int) -> int:
    """The seed of the index-th rate point of a sweep seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def isolated_seed(seed: int) -> int:
    """The seed of the isolated-baseline prompts: a point index no sweep reaches, so no prompt is shared."""
    return point_seed(seed, 2**31)


@dataclass(frozen=True)
class SweepPoint:
    """One offered rate of a sweep: its seed, raw outcomes and result.json content."""

    rate: float
    seed: int
    outcomes: tuple[RequestOutcome, ...]
    result: Mapping[str, Any]


async def run_sweep(
    config: ClientConfig,
    source: RequestSource,
    builder: PromptBuilder,
    rates: Sequence[float],
    seed: int,
    slo: SLOPolicy | None,
    process: ArrivalProcess = "poisson",
    warmup: Sequence[BenchRequest] = (),
    out_dir: Path | None = None,
    meta: Mapping[str, Any] | None = None,
    on_point: Callable[[float, int], None] | None = None,
    on_done: OnDone | None = None,
    after_point: Callable[[], Awaitable[dict[str, Any] | None]] | None = None,
    first_index: int = 0,
) -> list[SweepPoint]:
    """Run every rate in order; write `out_dir/rate_<R>.json` per point when `out_dir` is given.

    ``after_point`` (when given) is awaited after each point; what it returns is kept as the
    point's ``server`` field (e.g. the adaptive router's placement counters). ``first_index``: the
    index of ``rates[0]`` in the whole sweep (its seed), when a sweep is run a rate at a time."""
    points = []
    for index, rate in enumerate(rates):
        pseed = point_seed(seed, first_index + index)
        requests = source.make(builder, pseed)
        schedule = Schedule(rate=rate, process=process, seed=pseed)
        if on_point is not None:
            on_point(rate, len(requests))
        run = await run_requests(config, requests, schedule, warmup if index == 0 else (), on_done)
        extra = {"shared_prefix_len": builder.prefix_len, "sweep_seed": seed, **(meta or {})}
        result = build_result(run, slo, run_meta(config, schedule, source.label, pseed, extra))
        if after_point is not None:
            server = await after_point()
            if server is not None:
                result["server"] = server
        if out_dir is not None:
            write_json(out_dir / f"rate_{rate:g}.json", result)
        points.append(SweepPoint(rate=rate, seed=pseed, outcomes=run.outcomes, result=result))
    return points


def sweep_summary(
    points: Sequence[SweepPoint], slo: SLOPolicy | None, target: float = DEFAULT_ATTAINMENT_TARGET
) -> dict[str, Any]:
    """sweep.json: per-rate summaries and, with an SLO, the goodput (highest rate with >= target)."""
    rows = [{"rate": p.rate, "seed": p.seed, **{k: p.result.get(k) for k in POINT_FIELDS}} for p in points]
    goodput = None
    if slo is not None:
        goodput = goodput_rate([(p.rate, p.result["slo_attainment"]) for p in points], target)
    return {
        "slo": slo.describe() if slo is not None else None,
        "attainment_target": target,
        "goodput": goodput,
        "points": rows,
    }

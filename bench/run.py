"""One benchmark run: send requests on a schedule, time each one, and assemble result.json."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.arrivals import Schedule
from bench.client import ClientConfig, OpenAIClient, RequestOutcome
from bench.metrics import (
    DEFAULT_PERCENTILES,
    IsolatedBaseline,
    PromptBuckets,
    SLOPolicy,
    compute_metrics,
    per_request_lists,
)
from bench.workloads import BenchRequest, LengthSample, PromptBuilder

OnDone = Callable[[RequestOutcome], None]
BACKEND_NAMES = {"chat": "openai-chat", "completions": "openai"}  # NOTE: vLLM's --backend names


@dataclass(frozen=True)
class RunResult:
    """The outcomes in request order and the wall time from the first send to the last completion."""

    outcomes: tuple[RequestOutcome, ...]
    duration_s: float


async def drive(
    requests: Sequence[BenchRequest],
    schedule: Schedule,
    send: Callable[[BenchRequest], Awaitable[RequestOutcome]],
    on_done: OnDone | None = None,
) -> RunResult:
    """Release each request at its scheduled offset, with at most `schedule.max_concurrency` in flight."""
    limit = asyncio.Semaphore(schedule.max_concurrency) if schedule.max_concurrency else None

    async def one(request: BenchRequest) -> RequestOutcome:
        if limit is None:
            outcome = await send(request)
        else:
            async with limit:
                outcome = await send(request)
        if on_done is not None:
            on_done(outcome)
        return outcome

    start = time.perf_counter()
    tasks = []
    for request, offset in zip(requests, schedule.offsets(len(requests))):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request)))
    outcomes = await asyncio.gather(*tasks)
    return RunResult(outcomes=tuple(outcomes), duration_s=time.perf_counter() - start)


async def run_requests(
    config: ClientConfig,
    requests: Sequence[BenchRequest],
    schedule: Schedule,
    warmup: Sequence[BenchRequest] = (),
    on_done: OnDone | None = None,
) -> RunResult:
    """Send `warmup` one by one (untimed; a failure aborts: the server is not serving), then the run."""
    async with OpenAIClient(config) as client:
        for request in warmup:
            outcome = await client.send(request)
            if not outcome.success:
                raise RuntimeError(f"warm-up request to {config.url} failed: {outcome.error}")
        return await drive(requests, schedule, client.send, on_done)


def build_result(
    run: RunResult,
    slo: SLOPolicy | None,
    meta: Mapping[str, Any],
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """result.json: run metadata, vLLM-named aggregate metrics, then the per-request lists."""
    result: dict[str, Any] = {"date": dt.datetime.now().strftime("%Y%m%d-%H%M%S"), **meta}
    result["slo"] = slo.describe() if slo is not None else None
    result.update(compute_metrics(run.outcomes, run.duration_s, slo, percentiles))
    result.update(per_request_lists(run.outcomes))
    return result


def run_meta(
    config: ClientConfig, schedule: Schedule, label: str, seed: int, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The descriptive fields of result.json, named as vLLM names them where it has the field."""
    return {
        "backend": BACKEND_NAMES[config.endpoint],
        "base_url": config.base_url,
        "endpoint": config.endpoint,
        "model_id": config.model,
        "workload": label,
        "seed": seed,
        **schedule.describe(),
        **extra,
    }


def write_json(path: Path, data: Mapping[str, Any], indent: int | None = None) -> Path:
    """Write strict JSON (NaN or infinity is a bug here, so it raises) and create the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, allow_nan=False) + "\n", encoding="utf-8")
    return path


def isolated_samples(
    requests: Sequence[BenchRequest],
    prefix_len: int,
    buckets: PromptBuckets,
    per_bucket: int = 3,
    max_output_len: int = 32,
) -> list[LengthSample]:
    """Lengths for the isolated baseline: `per_bucket` requests of each prompt bucket the run uses.

    The answers are capped at `max_output_len` tokens: TPOT barely depends on answer length, and the
    baseline runs one request at a time.
    """
    chosen: dict[int, list[LengthSample]] = {}
    for r in requests:
        group = chosen.setdefault(buckets.index(r.prompt_len), [])
        if len(group) < per_bucket:
            group.append(LengthSample(r.kind, max(r.prompt_len - prefix_len, 1), min(r.output_len, max_output_len)))
    return [s for _, group in sorted(chosen.items()) for s in group]


async def measure_isolated(
    config: ClientConfig,
    builder: PromptBuilder,
    planned: Sequence[BenchRequest],
    seed: int,
    buckets: PromptBuckets,
    per_bucket: int = 3,
    max_output_len: int = 32,
    warmup: Sequence[BenchRequest] = (),
    on_start: Callable[[int], None] | None = None,
    on_done: OnDone | None = None,
) -> tuple[IsolatedBaseline, dict[str, Any]]:
    """The isolated baseline for the prompt buckets `planned` uses: fresh prompts (from `seed`) of the
    same lengths, sent one at a time. Returns it and isolated.json's content (baseline + result)."""
    samples = isolated_samples(planned, builder.prefix_len, buckets, per_bucket, max_output_len)
    if on_start is not None:
        on_start(len(samples))
    run = await run_requests(config, builder.build(samples, seed), Schedule(max_concurrency=1), warmup, on_done)
    baseline = IsolatedBaseline.from_outcomes(run.outcomes, buckets)
    meta = {"model_id": config.model, "base_url": config.base_url, "seed": seed}
    return baseline, {"baseline": baseline.to_dict(), **build_result(run, None, meta)}

"""Serving metrics from per-request timings: latency statistics, throughput, SLOs and goodput.

Definitions follow `vllm bench serve` (and its result.json keys) where the metric is the same:
- TTFT: first text chunk minus send time. E2EL: end of stream minus send time.
- TPOT excludes the first token: (e2el - ttft) / (output_tokens - 1), only for requests with > 1 token.
- ITL: every gap between consecutive text chunks, pooled over requests.
- Statistics run over successful requests; percentiles use numpy's default (linear) interpolation;
  an empty list gives 0, as in vLLM.
- `request_goodput` = requests meeting the SLO / duration. A request with one output token has TPOT 0
  for the SLO check (vLLM). `slo_attainment` = requests meeting the SLO / all requests, failures included.

SLOs are absolute (`--slo-ttft-ms/--slo-tpot-ms`) or DistServe-style relative to the same request
measured in isolation: TTFT <= k_ttft x isolated TTFT of its prompt-length bucket + 0.5 s and
TPOT <= k_tpot x isolated TPOT of the same bucket (defaults k_ttft=4, k_tpot=1.5).

Sweep goodput (DistServe) is the highest offered rate whose SLO attainment is >= 90 %.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bench.client import RequestOutcome

DEFAULT_PERCENTILES: tuple[float, ...] = (50, 90, 99)
DEFAULT_ATTAINMENT_TARGET = 0.9
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def latency_stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """`mean_/median_/std_/p{P}_{name}_ms` of values given in seconds (vLLM keys and numpy semantics)."""
    values = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000.0
    stats = {
        f"mean_{name}_ms": float(np.mean(values)),
        f"median_{name}_ms": float(np.median(values)),
        f"std_{name}_ms": float(np.std(values)),
    }
    for p in percentiles:
        stats[f"p{_p_word(p)}_{name}_ms"] = float(np.percentile(values, p))
    return stats


class SLOPolicy(Protocol):
    """A latency objective: the TTFT and TPOT limits (seconds) for a request of a given prompt length."""

    def limits(self, prompt_len: int) -> tuple[float, float]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class AbsoluteSLO:
    """Fixed limits in milliseconds; an omitted one is unconstrained."""

    ttft_ms: float = math.inf
    tpot_ms: float = math.inf

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.tpot_ms > 0):
            raise ValueError(f"SLO limits must be positive, got ttft={self.ttft_ms} ms tpot={self.tpot_ms} ms")
        if math.isinf(self.ttft_ms) and math.isinf(self.tpot_ms):
            raise ValueError("an absolute SLO needs --slo-ttft-ms, --slo-tpot-ms or both")

    def limits(self, prompt_len: int) -> tuple[float, float]:
        return self.ttft_ms / 1000.0, self.tpot_ms / 1000.0

    def describe(self) -> dict[str, Any]:
        finite = lambda x: None if math.isinf(x) else x
        return {"kind": "absolute", "ttft_ms": finite(self.ttft_ms), "tpot_ms": finite(self.tpot_ms)}


@dataclass(frozen=True)
class PromptBuckets:
    """Prompt-length buckets for isolated TTFT: bucket i covers [edges[i-1], edges[i]), the last is open."""

    edges: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192)

    def __post_init__(self) -> None:
        if list(self.edges) != sorted(set(self.edges)) or not self.edges or self.edges[0] < 1:
            raise ValueError(f"bucket edges must be distinct, increasing and positive, got {self.edges}")

    def index(self, prompt_len: int) -> int:
        return bisect.bisect_right(self.edges, prompt_len)

    def label(self, index: int) -> str:
        lo = self.edges[index - 1] if index > 0 else 0
        return f"{lo}-{self.edges[index] - 1}" if index < len(self.edges) else f">={lo}"


@dataclass(frozen=True)
class IsolatedBaseline:
    """Latency of requests sent one at a time: median TTFT and TPOT per prompt bucket, and the median
    TPOT of all (``tpot_s``: the one figure reports quote, and the limit where no bucket has a TPOT).

    NOTE: TPOT is judged per bucket like TTFT: a decode step over a 2K-token context reads that context
    (SmolLM2 on 2 cores: ~30 ms a token alone against ~19 over 200 tokens), so one TPOT for every
    length failed long prompts that were sent alone.
    """

    ttft_s: tuple[tuple[int, float], ...]
    tpot_s: float
    buckets: PromptBuckets = field(default_factory=PromptBuckets)
    tpot_by_bucket: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.ttft_s or not self.tpot_s > 0 or any(not t > 0 for _, t in self.ttft_s):
            raise ValueError("an isolated baseline needs a positive TTFT for some bucket and a positive TPOT")
        if any(not t > 0 for _, t in self.tpot_by_bucket):
            raise ValueError("an isolated baseline's per-bucket TPOTs must be positive")

    def ttft_for(self, prompt_len: int) -> float:
        """Isolated TTFT of the prompt's bucket, or of the nearest measured bucket (the longer on a tie)."""
        return _nearest(self.ttft_s, self.buckets.index(prompt_len))

    def tpot_for(self, prompt_len: int) -> float:
        """Isolated TPOT of the prompt's bucket (the nearest measured one), or the overall median."""
        return _nearest(self.tpot_by_bucket, self.buckets.index(prompt_len)) if self.tpot_by_bucket else self.tpot_s

    @classmethod
    def from_outcomes(
        cls, outcomes: Sequence[RequestOutcome], buckets: PromptBuckets | None = None
    ) -> IsolatedBaseline:
        buckets = buckets or PromptBuckets()
        by_bucket: dict[int, list[float]] = {}
        tpot_bucket: dict[int, list[float]] = {}
        for o in outcomes:
            if o.success and o.ttft_s is not None:
                b = buckets.index(o.prompt_len)
                by_bucket.setdefault(b, []).append(o.ttft_s)
                if o.tpot_s is not None and o.tpot_s > 0:
                    tpot_bucket.setdefault(b, []).append(o.tpot_s)
        tpots = [t for v in tpot_bucket.values() for t in v]
        if not by_bucket or not tpots:
            raise ValueError("the isolated run produced no successful multi-token request to measure")
        ttft = tuple((b, float(np.median(v))) for b, v in sorted(by_bucket.items()))
        tpot = tuple((b, float(np.median(v))) for b, v in sorted(tpot_bucket.items()))
        return cls(ttft_s=ttft, tpot_s=float(np.median(tpots)), buckets=buckets, tpot_by_bucket=tpot)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_edges": list(self.buckets.edges),
            "ttft_ms": {self.buckets.label(b): t * 1000.0 for b, t in self.ttft_s},
            "ttft_s_by_bucket": [[b, t] for b, t in self.ttft_s],
            "tpot_ms": self.tpot_s * 1000.0,
            "tpot_ms_by_bucket": {self.buckets.label(b): t * 1000.0 for b, t in self.tpot_by_bucket},
            "tpot_s_by_bucket": [[b, t] for b, t in self.tpot_by_bucket],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IsolatedBaseline:
        """A baseline from ``to_dict``'s output; one written before per-bucket TPOTs has one TPOT for all."""
        return cls(
            ttft_s=tuple((int(b), float(t)) for b, t in data["ttft_s_by_bucket"]),
            tpot_s=float(data["tpot_ms"]) / 1000.0,
            buckets=PromptBuckets(tuple(int(e) for e in data["bucket_edges"])),
            tpot_by_bucket=tuple((int(b), float(t)) for b, t in data.get("tpot_s_by_bucket", ())),
        )


def _nearest(by_bucket: tuple[tuple[int, float], ...], want: int) -> float:
    """The value of bucket ``want``, or of the nearest bucket that has one (the longer on a tie)."""
    return min(by_bucket, key=lambda bt: (abs(bt[0] - want), -bt[0]))[1]


@dataclass(frozen=True)
class RelativeSLO:
    """DistServe-style SLO scaled from the isolated baseline."""

    baseline: IsolatedBaseline
    k_ttft: float = 4.0
    k_tpot: float = 1.5
    ttft_slack_s: float = 0.5

    def __post_init__(self) -> None:
        if not (self.k_ttft > 0 and self.k_tpot > 0 and self.ttft_slack_s >= 0):
            raise ValueError(f"SLO scales must be positive, got k_ttft={self.k_ttft} k_tpot={self.k_tpot}")

    def limits(self, prompt_len: int) -> tuple[float, float]:
        ttft = self.k_ttft * self.baseline.ttft_for(prompt_len) + self.ttft_slack_s
        return ttft, self.k_tpot * self.baseline.tpot_for(prompt_len)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "relative",
            "k_ttft": self.k_ttft,
            "k_tpot": self.k_tpot,
            "ttft_slack_s": self.ttft_slack_s,
            "baseline": self.baseline.to_dict(),
        }


def meets_slo(outcome: RequestOutcome, slo: SLOPolicy) -> bool:
    """Whether a request succeeded within both limits (inclusive); a 1-token answer has TPOT 0."""
    ttft = outcome.ttft_s
    if not outcome.success or ttft is None:
        return False
    ttft_limit, tpot_limit = slo.limits(outcome.prompt_len)
    return ttft <= ttft_limit and (outcome.tpot_s or 0.0) <= tpot_limit


def slo_attainment(outcomes: Sequence[RequestOutcome], slo: SLOPolicy) -> float:
    """Share of all requests (failures count as misses) that meet the SLO."""
    return sum(meets_slo(o, slo) for o in outcomes) / len(outcomes) if outcomes else 0.0


def compute_metrics(
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    slo: SLOPolicy | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """Aggregate metrics of one run under vLLM's result.json names, plus `failed` and `slo_attainment`."""
    if not duration_s > 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [o for o in outcomes if o.success]
    total_input = sum(o.prompt_len for o in ok)
    total_output = sum(o.output_tokens for o in ok)
    good = sum(meets_slo(o, slo) for o in ok) if slo is not None else None
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s if good is not None else None,
        "slo_attainment": good / len(outcomes) if good is not None and outcomes else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    series: dict[str, list[float]] = {
        "ttft": [o.ttft_s for o in ok if o.ttft_s is not None],
        "tpot": [o.tpot_s for o in ok if o.tpot_s is not None],
        "itl": [gap for o in ok for gap in o.itls_s],
        "e2el": [o.e2el_s for o in ok],
    }
    for name in LATENCY_METRICS:
        result.update(latency_stats(name, series[name], percentiles))
    return result


def per_request_lists(outcomes: Sequence[RequestOutcome]) -> dict[str, list[Any]]:
    """vLLM's per-request lists (a failed request has ttft 0, latency 0, output_len 0), plus ours."""
    t0 = min((o.send_time for o in outcomes), default=0.0)
    return {
        "input_lens": [o.prompt_len for o in outcomes],
        "output_lens": [o.output_tokens if o.success else 0 for o in outcomes],
        "ttfts": [o.ttft_s if o.success and o.ttft_s is not None else 0.0 for o in outcomes],
        "itls": [o.itls_s if o.success else [] for o in outcomes],
        "latencies": [o.e2el_s if o.success else 0.0 for o in outcomes],
        "start_times": [o.send_time - t0 for o in outcomes],
        "errors": [o.error for o in outcomes],
        "requested_output_lens": [o.output_len for o in outcomes],
        "server_input_lens": [o.server_prompt_tokens for o in outcomes],
    }


def tpots_from_result(result: Mapping[str, Any]) -> list[float]:
    """Per-request TPOTs (s) rebuilt from a result.json's lists, for requests with > 1 output token."""
    rows = zip(result["latencies"], result["ttfts"], result["output_lens"], result["errors"])
    return [(lat - ttft) / (n - 1) for lat, ttft, n, err in rows if not err and n > 1]


def goodput_rate(points: Sequence[tuple[float, float]], target: float = DEFAULT_ATTAINMENT_TARGET) -> float:
    """DistServe goodput: the highest offered rate whose SLO attainment is >= `target`.

    `points` are (rate, attainment). Rates are scanned upward and the scan stops at the first rate
    that misses, so a pass above a miss (noise) never raises the goodput; 0.0 when the lowest misses.
    """
    best = 0.0
    for rate, attainment in sorted(points):
        if attainment < target:
            break
        best = rate
    return best


def slo_grid_goodput(
    points: Sequence[tuple[float, Sequence[RequestOutcome]]],
    baseline: IsolatedBaseline,
    k_ttfts: Sequence[float],
    k_tpots: Sequence[float],
    ttft_slack_s: float = 0.5,
    target: float = DEFAULT_ATTAINMENT_TARGET,
) -> list[list[float]]:
    """Goodput (req/s) for every (k_ttft, k_tpot): rows follow `k_ttfts`, columns `k_tpots`."""
    grid = []
    for k_ttft in k_ttfts:
        row = []
        for k_tpot in k_tpots:
            slo = RelativeSLO(baseline, k_ttft, k_tpot, ttft_slack_s)
            row.append(goodput_rate([(rate, slo_attainment(outs, slo)) for rate, outs in points], target))
        grid.append(row)
    return grid

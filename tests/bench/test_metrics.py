"""Metric math on synthetic timings: every expected number is worked out by hand, not by numpy."""

from __future__ import annotations

import math

import pytest

from bench.client import RequestOutcome
from bench.metrics import (
    AbsoluteSLO,
    IsolatedBaseline,
    PromptBuckets,
    RelativeSLO,
    compute_metrics,
    goodput_rate,
    latency_stats,
    meets_slo,
    per_request_lists,
    slo_attainment,
    slo_grid_goodput,
    tpots_from_result,
)


def outcome(
    ttft: float = 0.1,
    gaps: tuple[float, ...] = (0.01,),
    tokens: int | None = None,
    prompt_len: int = 100,
    send: float = 0.0,
    tail: float = 0.0,
    success: bool = True,
) -> RequestOutcome:
    """A request sent at `send` whose text chunks arrive at send+ttft and then after each gap."""
    times = [send + ttft]
    for gap in gaps:
        times.append(times[-1] + gap)
    return RequestOutcome(
        prompt_len=prompt_len,
        output_len=tokens or len(times),
        send_time=send,
        end_time=times[-1] + tail,
        chunk_times=tuple(times) if success else (),
        output_tokens=(tokens if tokens is not None else len(times)) if success else 0,
        success=success,
        error="" if success else "HTTP 500: boom",
    )


def test_percentiles_use_linear_interpolation_like_numpy_and_vllm() -> None:
    stats = latency_stats("ttft", [0.1 * i for i in range(1, 11)], (50, 90, 99))
    assert stats["mean_ttft_ms"] == pytest.approx(550.0)
    assert stats["median_ttft_ms"] == pytest.approx(550.0)
    assert stats["p50_ttft_ms"] == pytest.approx(550.0)
    assert stats["p90_ttft_ms"] == pytest.approx(910.0)  # rank 8.1 -> 900 + 0.1 * 100
    assert stats["p99_ttft_ms"] == pytest.approx(991.0)  # rank 8.91 -> 900 + 0.91 * 100
    assert stats["std_ttft_ms"] == pytest.approx(287.228, abs=1e-3)  # population std, as np.std


def test_fractional_percentile_key_and_empty_series_give_zero() -> None:
    stats = latency_stats("itl", [], (99.9,))
    assert stats == {"mean_itl_ms": 0.0, "median_itl_ms": 0.0, "std_itl_ms": 0.0, "p99.9_itl_ms": 0.0}


def test_tpot_excludes_the_first_token_and_uses_usage_count() -> None:
    # First chunk at 0.5 s, stream ends at 1.5 s; the server reports 11 tokens in only 3 chunks.
    o = outcome(ttft=0.5, gaps=(0.5, 0.5), tokens=11)
    assert o.ttft_s == pytest.approx(0.5)
    assert o.e2el_s == pytest.approx(1.5)
    assert o.tpot_s == pytest.approx(0.1)  # (1.5 - 0.5) / (11 - 1), not 1.5 / 11
    assert o.itls_s == pytest.approx([0.5, 0.5])
    metrics = compute_metrics([o], duration_s=2.0)
    assert metrics["mean_tpot_ms"] == pytest.approx(100.0)
    assert metrics["total_output_tokens"] == 11


def test_single_token_request_has_no_tpot_but_counts_as_zero_for_the_slo() -> None:
    one = outcome(ttft=0.2, gaps=(), tokens=1)
    assert one.tpot_s is None
    metrics = compute_metrics([one, outcome(ttft=0.2, gaps=(0.03,), tokens=2)], 1.0, AbsoluteSLO(300, 20))
    assert metrics["mean_tpot_ms"] == pytest.approx(30.0)  # only the 2-token request has a TPOT
    assert metrics["slo_attainment"] == pytest.approx(0.5)  # 1-token passes (TPOT 0), 2-token fails


def test_itl_pools_all_gaps_of_successful_requests() -> None:
    a = outcome(ttft=1.0, gaps=(0.1, 0.2))
    b = outcome(ttft=2.0, gaps=(0.4,))
    failed = outcome(success=False)
    metrics = compute_metrics([a, b, failed], duration_s=10.0)
    assert metrics["mean_itl_ms"] == pytest.approx((100 + 200 + 400) / 3)
    assert metrics["median_itl_ms"] == pytest.approx(200.0)


def test_throughputs_count_only_completed_requests() -> None:
    ok = [outcome(gaps=(0.01,) * 9, prompt_len=50) for _ in range(4)]  # 10 tokens each
    metrics = compute_metrics([*ok, outcome(success=False, prompt_len=999)], duration_s=10.0)
    assert (metrics["completed"], metrics["failed"]) == (4, 1)
    assert metrics["total_input_tokens"] == 200
    assert metrics["total_output_tokens"] == 40
    assert metrics["request_throughput"] == pytest.approx(0.4)
    assert metrics["output_throughput"] == pytest.approx(4.0)
    assert metrics["total_token_throughput"] == pytest.approx(24.0)
    assert metrics["request_goodput"] is None and metrics["slo_attainment"] is None


def test_result_keys_match_vllm_bench_serve() -> None:
    metrics = compute_metrics([outcome()], duration_s=1.0, slo=AbsoluteSLO(1000, 100))
    lists = per_request_lists([outcome()])
    vllm_keys = {
        "completed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "request_goodput",
        "duration",
        "ttfts",
        "itls",
        "input_lens",
        "output_lens",
        "errors",
        "latencies",
    } | {f"{s}_{m}_ms" for s in ("mean", "median", "p99", "std") for m in ("ttft", "tpot", "itl", "e2el")}
    assert vllm_keys <= set(metrics) | set(lists)


# NOTE: boundary cases use binary-exact times (0.25, 0.0625, ...) so float rounding cannot decide them.


def test_absolute_slo_limits_are_inclusive() -> None:
    slo = AbsoluteSLO(ttft_ms=250, tpot_ms=62.5)
    assert meets_slo(outcome(ttft=0.25, gaps=(0.0625,)), slo)
    assert not meets_slo(outcome(ttft=0.2501, gaps=(0.0625,)), slo)
    assert not meets_slo(outcome(ttft=0.25, gaps=(0.0626,)), slo)
    assert not meets_slo(outcome(success=False), slo)


def test_absolute_slo_with_one_limit_leaves_the_other_open() -> None:
    assert meets_slo(outcome(ttft=0.1, gaps=(10.0,)), AbsoluteSLO(ttft_ms=100))
    with pytest.raises(ValueError, match="--slo-ttft-ms"):
        AbsoluteSLO()
    with pytest.raises(ValueError, match="positive"):
        AbsoluteSLO(ttft_ms=-1)


def test_goodput_counts_requests_meeting_both_slos_per_second() -> None:
    outs = [
        outcome(ttft=0.125, gaps=(0.015625,)),  # good
        outcome(ttft=0.5, gaps=(0.03125,)),  # good: both exactly at the limits
        outcome(ttft=0.75, gaps=(0.015625,)),  # TTFT miss
        outcome(ttft=0.125, gaps=(0.0625,)),  # TPOT miss
        outcome(success=False),  # failure: a miss
    ]
    metrics = compute_metrics(outs, duration_s=4.0, slo=AbsoluteSLO(ttft_ms=500, tpot_ms=31.25))
    assert metrics["request_goodput"] == pytest.approx(0.5)  # 2 good / 4 s
    assert metrics["slo_attainment"] == pytest.approx(0.4)  # 2 good / 5 requests


def test_prompt_buckets() -> None:
    buckets = PromptBuckets((128, 256, 512))
    assert [buckets.index(n) for n in (1, 127, 128, 255, 256, 511, 512, 9000)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [buckets.label(i) for i in range(4)] == ["0-127", "128-255", "256-511", ">=512"]
    with pytest.raises(ValueError):
        PromptBuckets((256, 128))


def test_relative_slo_scales_the_isolated_baseline_of_the_prompt_bucket() -> None:
    buckets = PromptBuckets((128, 256, 512))
    baseline = IsolatedBaseline(ttft_s=((0, 0.125), (2, 0.25)), tpot_s=0.0625, buckets=buckets)
    slo = RelativeSLO(baseline)  # k_ttft=4, k_tpot=1.5, +0.5 s
    assert slo.limits(300) == (1.5, 0.09375)  # 4 x 0.25 + 0.5, 1.5 x 0.0625
    assert slo.limits(100) == (1.0, 0.09375)  # 4 x 0.125 + 0.5
    assert meets_slo(outcome(ttft=1.5, gaps=(0.09375,), prompt_len=300), slo)
    assert not meets_slo(outcome(ttft=1.51, gaps=(0.09375,), prompt_len=300), slo)
    assert not meets_slo(outcome(ttft=0.125, gaps=(0.094,), prompt_len=300), slo)
    assert meets_slo(outcome(ttft=1.0, gaps=(0.0625,), prompt_len=100), slo)
    assert not meets_slo(outcome(ttft=1.01, gaps=(0.0625,), prompt_len=100), slo)
    assert RelativeSLO(baseline, k_ttft=2, k_tpot=3).limits(300) == (1.0, 0.1875)


def test_unmeasured_bucket_falls_back_to_the_nearest_measured_one() -> None:
    baseline = IsolatedBaseline(ttft_s=((0, 0.05), (3, 0.4)), tpot_s=0.02, buckets=PromptBuckets((128, 256, 512)))
    assert baseline.ttft_for(130) == pytest.approx(0.05)  # bucket 1: nearest is 0
    assert baseline.ttft_for(300) == pytest.approx(0.4)  # bucket 2: nearest is 3
    assert baseline.ttft_for(10_000) == pytest.approx(0.4)


def test_isolated_baseline_takes_medians_and_round_trips() -> None:
    buckets = PromptBuckets((128, 256))
    outs = [
        outcome(ttft=0.1, gaps=(0.01,), prompt_len=50),
        outcome(ttft=0.3, gaps=(0.03,), prompt_len=60),
        outcome(ttft=0.2, gaps=(0.02,), prompt_len=70),
        outcome(ttft=0.9, gaps=(0.05,), prompt_len=200),
        outcome(success=False, prompt_len=201),
    ]
    baseline = IsolatedBaseline.from_outcomes(outs, buckets)
    assert [b for b, _ in baseline.ttft_s] == [0, 1]
    assert [t for _, t in baseline.ttft_s] == pytest.approx([0.2, 0.9])
    assert baseline.tpot_s == pytest.approx(0.025)  # median of 0.01, 0.03, 0.02, 0.05
    assert [b for b, _ in baseline.tpot_by_bucket] == [0, 1]
    assert [t for _, t in baseline.tpot_by_bucket] == pytest.approx([0.02, 0.05])
    assert baseline.tpot_for(65) == pytest.approx(0.02) and baseline.tpot_for(250) == pytest.approx(0.05)
    again = IsolatedBaseline.from_dict(baseline.to_dict())
    assert again == baseline
    with pytest.raises(ValueError, match="no successful"):
        IsolatedBaseline.from_outcomes([outcome(success=False)], buckets)


def test_sweep_goodput_is_the_highest_rate_at_or_above_90_percent() -> None:
    points = [(0.5, 1.0), (1.0, 0.95), (2.0, 0.9), (4.0, 0.89), (8.0, 0.95)]
    assert goodput_rate(points) == 2.0  # 0.9 counts; 8.0 passes only after a miss at 4.0
    assert goodput_rate([(4.0, 0.901), (1.0, 1.0), (2.0, 0.99)]) == 4.0  # unsorted input
    assert goodput_rate([(1.0, 0.899), (2.0, 1.0)]) == 0.0
    assert goodput_rate([(1.0, 0.5), (2.0, 0.4)], target=0.5) == 1.0


def test_slo_attainment_and_slo_map_grid() -> None:
    baseline = IsolatedBaseline(ttft_s=((0, 0.1),), tpot_s=0.01, buckets=PromptBuckets((128,)))
    # At rate 1 every request has TTFT 0.8 s and TPOT 0.012 s; at rate 2 TTFT 1.5 s and TPOT 0.025 s.
    low = [outcome(ttft=0.8, gaps=(0.012,), prompt_len=64) for _ in range(10)]
    high = [outcome(ttft=1.5, gaps=(0.025,), prompt_len=64) for _ in range(10)]
    assert slo_attainment(low, RelativeSLO(baseline, k_ttft=2, k_tpot=1.25)) == 0.0  # 0.8 > 0.7
    assert slo_attainment(low, RelativeSLO(baseline, k_ttft=4, k_tpot=1.25)) == 1.0  # 0.8 <= 0.9
    grid = slo_grid_goodput([(1.0, low), (2.0, high)], baseline, k_ttfts=(2, 4, 8, 12), k_tpots=(1.25, 3))
    # TTFT limits 0.7/0.9/1.3/1.7 s; TPOT limits 12.5/30 ms.
    assert grid == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 2.0]]


def test_per_request_lists_zero_out_failures_like_vllm() -> None:
    lists = per_request_lists([outcome(ttft=0.25, gaps=(0.05,), send=10.0), outcome(success=False, send=10.5)])
    assert lists["ttfts"] == pytest.approx([0.25, 0.0])
    assert lists["latencies"] == pytest.approx([0.3, 0.0])
    assert lists["output_lens"] == [2, 0]
    assert lists["itls"][1] == []
    assert lists["start_times"] == pytest.approx([0.0, 0.5])
    assert lists["errors"] == ["", "HTTP 500: boom"]


def test_tpots_rebuilt_from_result_lists_match_the_outcomes() -> None:
    outs = [outcome(ttft=0.2, gaps=(0.01, 0.03), tokens=5), outcome(gaps=(), tokens=1), outcome(success=False)]
    rebuilt = tpots_from_result(per_request_lists(outs))
    assert rebuilt == pytest.approx([outs[0].tpot_s])
    assert math.isclose(rebuilt[0], 0.04 / 4)


def test_duration_must_be_positive() -> None:
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([outcome()], duration_s=0.0)


def test_tpot_limit_follows_the_prompt_bucket_and_old_baselines_keep_one_tpot() -> None:
    buckets = PromptBuckets((128, 1024))
    baseline = IsolatedBaseline(ttft_s=((0, 0.2), (2, 4.0)), tpot_s=0.019, buckets=buckets,
                                tpot_by_bucket=((0, 0.018), (2, 0.030)))
    slo = RelativeSLO(baseline)
    long_alone = outcome(ttft=4.0, gaps=(0.030,) * 4, prompt_len=2000)  # a long prompt sent alone meets its SLO
    assert slo.limits(2000)[1] == pytest.approx(0.045) and meets_slo(long_alone, slo)
    assert slo.limits(100)[1] == pytest.approx(0.027)
    assert not meets_slo(outcome(ttft=0.2, gaps=(0.030,), prompt_len=100), slo)  # the same gaps on a short one
    old = baseline.to_dict()
    del old["tpot_s_by_bucket"], old["tpot_ms_by_bucket"]  # isolated.json written before per-bucket TPOTs
    assert IsolatedBaseline.from_dict(old).tpot_for(2000) == pytest.approx(0.019)
    with pytest.raises(ValueError, match="per-bucket TPOTs"):
        IsolatedBaseline(ttft_s=((0, 0.2),), tpot_s=0.019, tpot_by_bucket=((0, 0.0),))

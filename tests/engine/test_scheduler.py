"""Scheduler policy: decode first, chunked prefill budget, earliest-TTFT-deadline order with aging."""

from __future__ import annotations

import pytest
import torch

from appliance.engine import fork
from appliance.engine.kv_cache import PagePool
from appliance.engine.prefix_cache import RadixCache
from appliance.engine.request import Request, SamplingParams
from appliance.engine.scheduler import Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(order: str, budget: int = 64) -> tuple[Scheduler, FakeClock]:
    pool = PagePool(torch.zeros(2, 1, 512, 16, 1, 1))
    clock = FakeClock()
    s = Scheduler(pool, RadixCache(pool, enabled=False), max_running=16, max_prefill_tokens=budget,
                  prefill_order=order)
    s.prefill_rate = 100.0  # tokens/s
    return s, clock


def req(n: int, arrival: float, tag: int) -> Request:
    return Request(prompt_ids=[tag] * n, params=SamplingParams(max_tokens=4), arrival=arrival)


def run_step(s: Scheduler) -> list[tuple[int, int]]:
    sb = s.schedule()
    assert sb is not None
    for r, n, sample in zip(sb.requests, sb.extend_lens, sb.sample):
        r.computed_len += n
        if sample:
            r.output_ids.append(0)  # what the engine's sampler does
    return [(r.prompt_ids[0], n) for r, n in zip(sb.requests, sb.extend_lens)]


def test_fifo_long_prompt_blocks_short_one() -> None:
    s, clock = make("fifo")
    s.add(req(1000, clock.t, tag=1))
    s.add(req(20, clock.t + 0.01, tag=2))
    assert run_step(s) == [(1, 64)]  # the whole budget goes to the long prompt first


def test_slack_short_prompt_overtakes_a_chunked_long_one() -> None:
    s, clock = make("slack")
    s.add(req(1000, clock.t, tag=1))
    assert run_step(s) == [(1, 64)]
    clock.t += 0.5
    s.add(req(20, clock.t, tag=2))
    assert run_step(s)[0] == (2, 20)  # short first, the long one gets the rest of the budget
    clock.t += 0.1
    assert run_step(s) == [(2, 1), (1, 64)]  # the short one decodes; the long one gets the prefill budget


def test_slack_two_long_prompts_arriving_together_do_not_take_turns() -> None:
    s, clock = make("slack")
    s.add(req(300, clock.t, tag=1))
    s.add(req(300, clock.t + 0.2, tag=2))  # 3 s of prefill each at 100 tokens/s
    for _ in range(4):
        clock.t += 0.64  # a chunk's time: the first prompt's deadline stays the earlier one
        assert run_step(s) == [(1, 64)]
    assert run_step(s) == [(1, 44)]  # the first prompt done, its first token 2.5 s sooner
    assert run_step(s) == [(1, 1), (2, 64)]  # the second starts in the next step, no later than beside it


def test_a_prompt_runs_whole_rather_than_leave_a_sliver() -> None:
    s, clock = make("fifo")  # budget 64: a rest of up to 16 tokens joins the chunk
    s.add(req(80, clock.t, tag=1))
    s.add(req(81, clock.t, tag=2))
    assert run_step(s) == [(1, 80)]
    assert run_step(s) == [(1, 1), (2, 64)]  # 17 would be left over 81: more than a sliver
    assert run_step(s) == [(1, 1), (2, 17)]


def test_a_step_that_ends_a_prompt_starts_no_other() -> None:
    s, clock = make("fifo")
    s.add(req(100, clock.t, tag=1))
    assert run_step(s) == [(1, 64)]
    s.add(req(50, clock.t, tag=2))  # its 28-token head beside 1's last 36 would hold 1's first token
    assert run_step(s) == [(1, 36)]
    assert run_step(s) == [(1, 1), (2, 50)]


def test_a_tiny_prompt_still_joins_a_step_that_ends_another() -> None:
    s, clock = make("slack")
    s.add(req(100, clock.t, tag=1))
    assert run_step(s) == [(1, 64)]
    s.add(req(4, clock.t + 5.0, tag=2))  # 4 tokens: at most 64 // 16, less than a step of its own costs
    s.add(req(30, clock.t + 5.0, tag=3))
    assert run_step(s) == [(1, 36), (2, 4)]
    assert run_step(s) == [(1, 1), (2, 1), (3, 30)]


def test_slack_ages_long_prompts_in() -> None:
    s, clock = make("slack")
    s.add(req(1000, clock.t, tag=1))
    clock.t += 60.0  # the long prompt has waited a minute: its slack is now below a fresh short one's
    s.add(req(20, clock.t, tag=2))
    assert run_step(s)[0][0] == 1


def test_decodes_are_always_scheduled_before_prefill() -> None:
    s, clock = make("slack", budget=16)
    s.add(req(10, clock.t, tag=7))
    run_step(s)  # prefilled and sampled: now decoding
    s.add(req(500, clock.t, tag=8))
    assert run_step(s) == [(7, 1), (8, 16)]


def test_prefill_chunk_defaults_by_device_and_keeps_an_explicit_budget() -> None:
    from appliance.config import CPU_PREFILL_CHUNK, GPU_PREFILL_CHUNK, EngineConfig

    assert EngineConfig().prefill_chunk == CPU_PREFILL_CHUNK
    assert EngineConfig(device="cuda:0").prefill_chunk == GPU_PREFILL_CHUNK
    assert EngineConfig(max_prefill_tokens=40, device="cuda:0").prefill_chunk == 40
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 0"):
        EngineConfig(max_prefill_tokens=-1)


def test_forked_samples_join_the_step_that_ends_the_first() -> None:
    pool = PagePool(torch.zeros(2, 1, 512, 16, 1, 1))
    cache = RadixCache(pool)
    s = Scheduler(pool, cache, max_running=16, max_prefill_tokens=256)
    parent = Request(prompt_ids=list(range(40)), params=SamplingParams(max_tokens=4, n=4), arrival=0.0)
    s.add(parent)
    assert run_step(s) == [(0, 40)]
    s.add_front(fork.children(parent, fork.publish_prompt(cache, parent), cache))
    # each sample shares the two full pages and computes the last 8 tokens: all three in one step
    assert run_step(s) == [(0, 1), (0, 8), (0, 8), (0, 8)]

"""Routing policies on fake workers."""

from __future__ import annotations

from appliance.serve.load_report import LoadReport
from appliance.serve.policies import CacheAware, LeastLoad, WorkerHandle


def workers() -> list[WorkerHandle]:
    return [WorkerHandle(name=f"w{i}", role="unified", url=f"http://w{i}", healthy=True) for i in range(2)]


def test_cache_aware_follows_a_long_shared_prefix() -> None:
    ws = workers()
    pol = CacheAware(page_size=4)
    doc = list(range(100, 164))
    pol.record(ws[1], doc + [1, 2])
    assert pol.pick(ws, doc + [7, 8, 9]) is ws[1]


def test_a_short_shared_system_prompt_does_not_pin_everything_to_one_engine() -> None:
    ws = workers()
    pol = CacheAware(page_size=4)
    system = [9, 9, 9, 9]
    picks = set()
    for i in range(4):  # fewer than the imbalance threshold: only the match rule can spread them
        prompt = system + [i] * 40
        w = pol.pick(ws, prompt)
        pol.record(w, prompt)
        w.inflight += 1
        picks.add(w.name)
    assert picks == {"w0", "w1"}


def test_imbalance_falls_back_to_least_load() -> None:
    ws = workers()
    pol = CacheAware(page_size=4, imbalance=2)
    doc = list(range(64))
    pol.record(ws[0], doc)
    ws[0].inflight = 5
    assert pol.pick(ws, doc) is ws[1]
    assert LeastLoad().pick(ws, doc) is ws[1]


def test_a_worker_is_remembered_holding_at_most_its_kv_pages() -> None:
    ws = workers()
    pol = CacheAware(page_size=4)
    old, new = list(range(100, 132)), list(range(200, 232))  # 8 pages each
    pol.record(ws[0], old)
    pol.record(ws[0], new)
    assert pol.matched_tokens(ws[0], old) == 32  # no report yet: the policy's own bound
    ws[0].load = LoadReport(total_pages=10, free_pages=10)
    pol.record(ws[0], new)  # the pool holds 10 pages: the old prompt's are gone there
    assert len(pol.seen[ws[0].url]) == 10
    assert pol.matched_tokens(ws[0], new) == 32 and pol.matched_tokens(ws[0], old) == 0

"""Radix prefix cache: matching, ref-counted locking, LRU eviction, no page leaks."""

from __future__ import annotations

import pytest
import torch

from appliance.engine.kv_cache import PagePool
from appliance.engine.prefix_cache import RadixCache


def make(num_pages: int = 8, page_size: int = 2) -> tuple[PagePool, RadixCache]:
    pool = PagePool(torch.zeros(2, 1, num_pages, page_size, 1, 1))
    return pool, RadixCache(pool)


def test_match_insert_and_duplicates() -> None:
    pool, cache = make()
    pages = pool.alloc(3)
    ids = [1, 2, 3, 4, 5]  # two full pages + one partial
    to_free = cache.insert(ids, pages)
    assert to_free == [pages[2]]
    pool.free(to_free)
    path = cache.match_prefix([1, 2, 3, 4, 9])
    assert [n.page for n in path] == pages[:2]
    assert cache.match_prefix([1, 2, 3, 4], max_pages=1)[0].page == pages[0]
    dup = pool.alloc(2)
    assert sorted(cache.insert([1, 2, 3, 4], dup)) == sorted(dup)  # already cached: caller frees its copies
    pool.free(dup)


def test_locked_pages_are_not_evicted_and_lru_order() -> None:
    pool, cache = make()
    a, b = pool.alloc(1), pool.alloc(1)
    cache.insert([1, 1], a)
    cache.insert([2, 2], b)
    path = cache.match_prefix([1, 1, 0])
    cache.lock(path)
    assert cache.evict(2) == 1  # only [2, 2] is unlocked
    assert cache.match_prefix([2, 2, 0]) == []
    cache.unlock(path)
    assert cache.evict(5) == 1
    assert pool.num_free == pool.num_pages
    with pytest.raises(RuntimeError):
        cache.unlock(path)


def test_lru_evicts_oldest_first() -> None:
    pool, cache = make()
    for k in range(3):
        cache.insert([k, k], pool.alloc(1))
    cache.match_prefix([0, 0, 5])  # touch 0: now 1 is the oldest
    assert cache.evict(1) == 1
    assert cache.match_prefix([1, 1, 5]) == []
    assert cache.match_prefix([0, 0, 5]) != []


def test_double_free_raises() -> None:
    pool, _ = make()
    p = pool.alloc(1)
    pool.free(p)
    with pytest.raises(RuntimeError, match="twice"):
        pool.free(p)

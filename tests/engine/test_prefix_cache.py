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


def test_evictable_count_follows_locks_inserts_and_evictions() -> None:
    """The counted evictable pages equal a walk of the tree through random inserts, locks, unlocks and
    evictions (the scheduler asks at every admission, so it is counted, not walked)."""
    import random

    def walked(cache: RadixCache) -> int:
        count, stack = 0, [cache.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            count += node is not cache.root and node.lock_ref == 0
        return count

    rng = random.Random(0)
    pool, cache = make(num_pages=64, page_size=2)
    held: list[list] = []
    for _ in range(2000):
        op = rng.random()
        ids = [rng.randrange(3) for _ in range(2 * rng.randrange(1, 5))]
        if op < 0.35 and pool.num_free >= len(ids) // 2:
            pool.free(cache.insert(ids, pool.alloc(len(ids) // 2)))
        elif op < 0.6:
            path = cache.match_prefix(ids)
            cache.lock(path)
            held.append(path)
        elif op < 0.85 and held:
            cache.unlock(held.pop(rng.randrange(len(held))))
        else:
            cache.evict(rng.randrange(1, 4))
        assert cache.evictable_pages() == walked(cache)
    for path in held:
        cache.unlock(path)
    assert cache.evictable_pages() == cache.num_cached_pages == walked(cache)
    cache.reset()
    assert cache.evictable_pages() == 0 and pool.num_free == pool.num_pages

"""Radix prefix cache over token ids at page granularity: ref-counted, LRU eviction.

Each node below the root stands for ONE full page: its key is that page's ``page_size`` token ids
and its value is the page index holding their K/V. A request that matches a path reuses those pages
(read-only) and locks the path; when it finishes it inserts its own full pages, handing them to the
cache. Unlocked leaves are evicted least-recently-used first when the pool runs dry.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from appliance.engine.kv_cache import PagePool


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]
    page: int
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0


class RadixCache:
    """The prefix cache of one engine. All methods run on the scheduler's thread."""

    def __init__(self, pool: PagePool, enabled: bool = True) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.enabled = enabled
        self.root = RadixNode(key=(), page=-1, parent=None, lock_ref=1)
        self._clock = itertools.count(1)
        self.num_cached_pages = 0
        self._locked = 0  # nodes below the root with lock_ref > 0 (every one is in the tree: only unlocked go)
        self.hit_tokens = 0
        self.query_tokens = 0

    def _key(self, ids: Sequence[int], i: int) -> tuple[int, ...]:
        return tuple(ids[i * self.page_size : (i + 1) * self.page_size])

    def match_prefix(self, ids: Sequence[int], max_pages: int | None = None) -> list[RadixNode]:
        """The longest cached path of full pages that prefixes ``ids`` (at most ``max_pages``)."""
        self.query_tokens += len(ids)
        if not self.enabled:
            return []
        limit = len(ids) // self.page_size if max_pages is None else min(max_pages, len(ids) // self.page_size)
        path: list[RadixNode] = []
        node = self.root
        now = next(self._clock)
        for i in range(limit):
            child = node.children.get(self._key(ids, i))
            if child is None:
                break
            child.last_access = now
            path.append(child)
            node = child
        self.hit_tokens += len(path) * self.page_size
        return path

    def lock(self, path: Sequence[RadixNode]) -> None:
        for n in path:
            self._locked += n.lock_ref == 0
            n.lock_ref += 1

    def unlock(self, path: Sequence[RadixNode]) -> None:
        for n in path:
            if n.lock_ref <= 0:
                raise RuntimeError("radix node unlocked more often than locked")
            n.lock_ref -= 1
            self._locked -= n.lock_ref == 0

    def insert(self, ids: Sequence[int], pages: Sequence[int]) -> list[int]:
        """Hand the full pages of ``ids`` to the cache.

        Returns the pages the caller must free itself: duplicates of pages the cache already holds,
        plus the trailing partial page. With the cache disabled every page comes back.
        """
        n_full = min(len(ids) // self.page_size, len(pages))
        if not self.enabled:
            return list(pages)
        to_free: list[int] = []
        node = self.root
        now = next(self._clock)
        for i in range(n_full):
            key = self._key(ids, i)
            child = node.children.get(key)
            if child is None:
                child = RadixNode(key=key, page=pages[i], parent=node)
                node.children[key] = child
                self.num_cached_pages += 1
            elif child.page != pages[i]:
                to_free.append(pages[i])
            child.last_access = now
            node = child
        to_free.extend(pages[n_full:])
        return to_free

    def evictable_pages(self) -> int:
        """Pages that :meth:`evict` could free right now: the unlocked ones (a locked node's ancestors are
        locked too, so every unlocked node heads an unlocked subtree). Counted as locks change, not by a
        walk of the tree: the scheduler asks at every admission."""
        return self.num_cached_pages - self._locked

    def evict(self, num_pages: int) -> int:
        """Free up to ``num_pages`` unlocked leaf pages, least recently used first."""
        leaves = [(n.last_access, id(n), n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(leaves)
        freed = 0
        while leaves and freed < num_pages:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            self.pool.free([node.page])
            self.num_cached_pages -= 1
            freed += 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, (parent.last_access, id(parent), parent))
        return freed

    def _leaves(self) -> list[RadixNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out

    def reset(self) -> int:
        """Evict everything unlocked (tests use this to check for leaks)."""
        return self.evict(self.num_cached_pages)

"""n samples of one prompt: one prefill, then the prompt's KV pages shared by every sample.

When a request with ``params.n > 1`` has its whole prompt in the cache (its prefill just sampled the
first token, or a decode engine took it over from prefill), its full prompt pages are published in
the radix cache (the request locks them from then on, and later hands them over as it always does),
and ``n - 1`` child requests are queued at the front of the waiting queue, each holding a lock on the
published path until the scheduler admits it. Admission then matches that path: a child shares every
full prompt page (read-only, ref-counted by the radix locks) and computes only the prompt's last,
partial page itself (under ``page_size`` tokens) before sampling its own first token. No page is
copied, so TP ranks > 0 need nothing beyond the batches they already follow.

Child ``i`` (1 .. n-1) is ``<parent id>~<i>``, with ``seed + i`` (mod 2^63) when the parent has a seed
(sampling is keyed by seed and position, so sample ``i`` is the same whatever runs beside it). With
the prefix cache off, children simply prefill the whole prompt again.
"""

from __future__ import annotations

import time
from dataclasses import replace

from appliance.engine.prefix_cache import RadixCache, RadixNode
from appliance.engine.request import Request

SEED_MOD = 2**63


def wants_fork(req: Request) -> bool:
    """``req`` asks for more samples, has not forked yet, and its prompt is computed here."""
    return (req.params.n > 1 and not req.forked and not req.prefill_only and req.group is None
            and req.computed_len >= req.prompt_len)


def publish_prompt(cache: RadixCache, req: Request) -> list[RadixNode]:
    """Put ``req``'s full prompt pages in the cache; ``req`` now locks that path. Returns the path."""
    full = req.prompt_len // cache.page_size
    ids = req.prompt_ids[: full * cache.page_size]
    cache.insert(ids, req.pages[:full])  # NOTE: pages it declines (another copy is cached) stay req's own
    path = cache.match_prefix(ids)
    cache.lock(path)
    cache.unlock(req.prefix_nodes)
    req.prefix_nodes = path
    return path


def children(parent: Request, path: list[RadixNode], cache: RadixCache) -> list[Request]:
    """Samples 1 .. n-1 of ``parent``, each holding a lock on ``path`` until it is admitted."""
    p = parent.params
    out = []
    for i in range(1, p.n):
        seed = None if p.seed is None else (p.seed + i) % SEED_MOD
        child = Request(prompt_ids=list(parent.prompt_ids), params=replace(p, n=1, seed=seed, prompt_logprobs=None),
                        early_stops=parent.early_stops,
                        request_id=f"{parent.request_id}~{i}", arrival=time.monotonic())
        child.group, child.index = parent.request_id, i
        cache.lock(path)
        child.fork_hold = list(path)
        out.append(child)
    parent.forked = True
    return out

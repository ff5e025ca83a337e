"""What a pdbox server says about its own placement, scraped after each rate point.

For ``--mode auto`` that is how requests were placed (``pdbox_auto_decisions_total`` by decision and
reason), how many engines changed leaning and how many decoding requests moved between engines, and
where each leans now. Other servers (a peer such as
vLLM, or the fixed modes) answer ``None``: the comparison never depends on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from appliance.monitor.prom import Metrics


def parse_decisions(metrics_text: str) -> dict[str, float]:
    """``{"<decision>:<reason>": count}`` from a Prometheus text page (router series only)."""
    out: dict[str, float] = {}
    for s in Metrics.from_text(metrics_text).series("pdbox_auto_decisions_total"):
        if s.labels.get("role", "router") != "router":
            continue
        key = f"{s.labels.get('decision', '?')}:{s.labels.get('reason', '?')}"
        out[key] = out.get(key, 0.0) + s.value
    return out


async def placement(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The server's placement counters now, or None when it keeps none (or cannot say in time)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), headers=headers) as s:
            async with s.get(root + "/workers") as resp:
                if resp.status != 200:
                    return None
                workers = await resp.json(content_type=None)
            if "role_switches" not in workers:
                return None
            async with s.get(root + "/metrics") as resp:
                text = await resp.text() if resp.status == 200 else ""
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None
    return {
        "decisions": parse_decisions(text),
        "role_switches": int(workers["role_switches"]),
        "decodes_moved": int(workers.get("decodes_moved", 0)),
        "decode_moves_failed": int(workers.get("decode_moves_failed", 0)),
        "leanings": {w["name"]: w.get("leaning", "") for w in workers.get("workers", [])},
        "last_decision": workers.get("last_decision", ""),
    }


def delta(after: dict[str, Any] | None, before: dict[str, Any] | None) -> dict[str, Any] | None:
    """The counters of one rate point: ``after`` minus what the point before had left."""
    if after is None:
        return None
    prev = before or {"decisions": {}, "role_switches": 0}
    decisions = {k: v - prev["decisions"].get(k, 0.0) for k, v in after["decisions"].items()}
    counts = {k: after.get(k, 0) - prev.get(k, 0) for k in ("role_switches", "decodes_moved", "decode_moves_failed")}
    return {**after, "decisions": {k: v for k, v in decisions.items() if v}, **counts}

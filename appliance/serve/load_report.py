"""A worker's ``/load`` report: what its engine holds and how fast it runs, typed once.

The worker writes it between engine steps (``Worker.load_info``); the router's pool reads it into
``WorkerHandle.load`` and lists it in ``/workers``; the monitor reads it from there. Every reader
goes through :func:`decode_load`. A field a report leaves out reads as its default, so a worker
that has not reported yet (``NO_REPORT``) reads as idle and empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec


class LoadReport(msgspec.Struct, frozen=True, kw_only=True):
    name: str = ""
    role: str = ""
    pid: int = 0
    running: int = 0  # requests in the running batch
    waiting: int = 0  # requests waiting for admission
    reserved_rooms: int = 0  # decode reservations waiting for a KV handoff
    total_pages: int = 0  # KV pool
    free_pages: int = 0
    quarantined_pages: int = 0  # pages a failed handoff may still be written into
    cached_pages: int = 0  # held by the prefix cache
    evictable_pages: int = 0  # cached pages no request holds
    page_size: int = 0
    tp: int = 1
    devices: str = ""
    transport: str = ""  # '' when the worker has no KV transport
    model: str = ""
    uptime_s: float = 0.0
    max_model_len: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens not yet computed (waiting, and running without a first token)
    decoding: int = 0  # running requests past their first token
    prefill_tok_s: float = 0.0  # the engine's measured prefill rate (0 until measured)
    decode_step_s: float = 0.0  # its measured decode step (0 until measured)
    prefill_chunk: int = 0  # prompt tokens per prefill step
    warmup_s: float = 0.0  # the engine's start-up warm-up (CUDA graph capture, kernel compiles); 0 on CPU


NO_REPORT = LoadReport()  # a worker's load before its first report


def listed(report: LoadReport) -> dict[str, Any]:
    """The report as the router's ``/workers`` lists it: ``{}`` before the worker's first one."""
    return {} if report is NO_REPORT else msgspec.structs.asdict(report)


def decode_load(raw: bytes | str | Mapping[str, Any]) -> LoadReport:
    """A ``/load`` report from its JSON body, or from that body already parsed (``/workers``' ``load``).

    Raises ``ValueError`` naming the field when the report is not one.
    """
    try:
        if isinstance(raw, (bytes, bytearray, str)):
            return msgspec.json.decode(raw, type=LoadReport)
        return msgspec.convert(raw, LoadReport)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"not a /load report: {exc}") from exc


def warmup_summary(reports: list[LoadReport]) -> str:
    """The console's line on the engines' start-up warm-up, or '' when none ran one (CPU engines)."""
    ran = [r for r in reports if r.warmup_s > 0]
    if not ran:
        return ""
    return "warm-up (CUDA graphs, kernel compiles): " + ", ".join(f"{r.name} {r.warmup_s:.1f} s" for r in ran)

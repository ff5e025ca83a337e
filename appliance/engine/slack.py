"""The TTFT goal a prompt is scheduled against: plain arithmetic, shared by the engine's scheduler
and the router's adaptive placement (which must not import torch: the router needs no GPU)."""

from __future__ import annotations

SLACK_K = 4.0  # a prompt's TTFT goal is SLACK_K x its isolated prefill time + 0.5 s


def ttft_deadline(arrival: float, prompt_len: int, rate: float, k: float = SLACK_K) -> float:
    """When a prompt should have its first token: ``k x isolated prefill time + 0.5 s`` after it
    arrived (DistServe-style goal). Prefill runs earliest deadline first: short prompts have little
    work and come early, and a long prompt that has waited ages in.

    The deadline does not move as a prompt's chunks run. An order by what is left to spare
    (least laxity first) would: two long prompts that arrived together would then take turns,
    chunk by chunk, and both have their first token late; by deadline the first one finishes first.
    """
    return arrival + k * prompt_len / max(rate, 1.0) + 0.5

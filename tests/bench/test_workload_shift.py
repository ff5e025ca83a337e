"""The `shift` workload: a chat-heavy first half, then a RAG-heavy second half."""

from __future__ import annotations

from bench.workloads import get_workload, sample_lengths


def test_shift_has_two_phases_with_exact_shares() -> None:
    s = sample_lengths(get_workload("shift"), 40, seed=5)
    first, second = s[:20], s[20:]
    assert sum(x.kind == "chat" for x in first) == 18
    assert sum(x.kind == "rag" for x in second) == 12
    assert s == sample_lengths(get_workload("shift"), 40, seed=5)
    assert all((x.kind == "rag") == (x.prompt_len >= 1024) for x in s)

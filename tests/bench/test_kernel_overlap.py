"""The GPU engine bench's kernel profile counts time covered by overlapping kernels once (with PDL a kernel's
blocks start while the one before drains), so a step's gaps are not understated (pure: on CPU)."""

from __future__ import annotations

from bench.engine_gpu import covered_us


def test_overlapping_kernels_are_covered_once() -> None:
    assert covered_us([]) == 0.0
    assert covered_us([(0.0, 10.0), (5.0, 12.0), (20.0, 25.0)]) == 17.0  # summed: 22
    assert covered_us([(2.0, 3.0), (0.0, 10.0)]) == 10.0  # one inside another, in any order
    assert covered_us([(0.0, 1.0), (1.0, 2.0)]) == 2.0  # back to back

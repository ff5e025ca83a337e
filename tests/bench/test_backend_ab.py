"""``bench.backend_ab`` runs an older revision's CPU backend in today's model: one from before the backends
had ``norm_linear`` gets the two calls it stands for."""

from __future__ import annotations

import subprocess

import pytest

BEFORE_NORM_LINEAR = "d395197"  # the last commit whose backends had no norm_linear


def test_a_revision_before_norm_linear_still_runs() -> None:
    from bench import backend_ab

    if subprocess.run(["git", "cat-file", "-e", f"{BEFORE_NORM_LINEAR}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"{BEFORE_NORM_LINEAR} is not in this clone's history")
    got = backend_ab.run(BEFORE_NORM_LINEAR, batch=1, rounds=1, steps=1, prompt_len=8)
    assert got["rev_ms"] > 0 and got["tree_ms"] > 0 and got["batch"] == 1

"""`pdbox` loads the bench and slurm packages only for their own commands."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_cli_loads_neither_bench_nor_slurm() -> None:
    code = ("import sys, appliance.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bench', 'slurm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_group_is_listed_and_loads_on_use() -> None:
    from click.testing import CliRunner

    from appliance.cli import main

    listed = CliRunner().invoke(main, ["--help"])
    assert listed.exit_code == 0 and all(g in listed.output for g in ("bench", "monitor", "slurm", "up"))
    for group in ("bench", "slurm", "monitor"):
        r = CliRunner().invoke(main, [group, "--help"])
        assert r.exit_code == 0 and "Usage: " in r.output, (group, r.output)


def test_the_router_needs_no_torch() -> None:
    """The router as a process of its own (Slurm mode) does not import torch: it needs no GPU, and
    importing it took 4.1 s and ~190 MB more here (0.6 s, 44 MB without); it came in through the
    scheduler's TTFT-slack rule."""
    code = ("import sys, appliance.serve.router_main, appliance.serve.router; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout

"""The CPU backend's kernels at a git revision against the working tree's, decode steps alternating in
one process (so the machine's noise falls on both sides alike).

    python -m bench.backend_ab --rev REV [--batch 1 --batch 16] [--prompt-len 64] [--rounds 12] [--threads 1]

Both engines load the same model with the same packed weights and linear layers; only the backend's
other kernels (attention, norms, rotary, activations) differ. Prints each side's median ms/step and
the median of the per-round ratios.
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import click
import torch

from appliance.cli_support import HELP_OPTIONS, run_command

BACKEND = "appliance/engine/attention_cpu.py"


def backend_at(rev: str, folder: Path):
    """The ``CpuAttentionBackend`` class of ``rev``'s attention_cpu.py, loaded as its own module."""
    src = subprocess.run(["git", "show", f"{rev}:{BACKEND}"], check=True, capture_output=True, text=True).stdout
    path = folder / "backend_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("backend_at_rev", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # a dataclass looks its module up there while the module runs
    spec.loader.exec_module(mod)
    return mod.CpuAttentionBackend


def engine(backend_cls=None):
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine

    e = Engine(None, EngineConfig(attention_backend="cpu"))
    if backend_cls is not None:
        model = e.runner.model
        old = backend_cls()
        old.linear = model.backend.linear  # the same packed weights and GEMMs on both sides
        if not hasattr(old, "norm_linear"):  # a revision before the backends had it: their two calls
            from appliance.engine.attention import norm_then_linear

            old.norm_linear = types.MethodType(norm_then_linear, old)
        model.backend = old
    return e


def run(rev: str, batch: int, rounds: int, steps: int = 3, prompt_len: int = 64) -> dict:
    from appliance.engine.request import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        sides = {"rev": engine(backend_at(rev, Path(tmp))), "tree": engine()}
    for e in sides.values():
        params = SamplingParams(max_tokens=steps * (rounds + 2) + 8, temperature=0, ignore_eos=True)
        reqs = [e.add_request(list(range(100 + b, 100 + b + prompt_len)), params) for b in range(batch)]
        while any(not r.output_ids for r in reqs):  # every prompt prefilled: the rounds time decode steps
            e.step()
        for _ in range(steps):
            e.step()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for k, e in sides.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                e.step()
            times[k].append((time.perf_counter() - t0) / steps)
    ratio = statistics.median(t / r for r, t in zip(times["rev"], times["tree"]))
    return {"batch": batch, "prompt_len": prompt_len, "rev_ms": round(statistics.median(times["rev"]) * 1e3, 1),
            "tree_ms": round(statistics.median(times["tree"]) * 1e3, 1), "tree_over_rev": round(ratio, 3)}


@click.command(help=__doc__.split("\n\n")[0], context_settings=HELP_OPTIONS)
@click.option("--rev", required=True, help="git revision whose attention_cpu.py is the baseline")
@click.option("--batch", type=int, multiple=True, help="decode batch sizes (default 1 and 16)")
@click.option("--prompt-len", type=int, default=64, show_default=True, help="prompt tokens of each request")
@click.option("--rounds", type=int, default=12)
@click.option("--threads", type=int, default=1)
def command(rev: str, batch: tuple[int, ...], prompt_len: int, rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    for b in batch or (1, 16):
        r = run(rev, b, rounds, prompt_len=prompt_len)
        print(f"batch {r['batch']}, {prompt_len}-token prompts: {rev} {r['rev_ms']} ms/step, "
              f"tree {r['tree_ms']} ms/step, tree/{rev} {r['tree_over_rev']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.backend_ab ARGS``; returns the exit status (2: a bad or missing option)."""
    return run_command(command, argv, "python -m bench.backend_ab")


if __name__ == "__main__":
    sys.exit(main())

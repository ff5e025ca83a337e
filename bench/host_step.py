"""The engine's own host time per decode step, without the model: ``python -m bench.host_step``.

On a GPU a CUDA-graph decode step costs the host one replay launch, yet the wall step also holds the
host's bookkeeping around it (scheduling, the step's metadata, reading the sampled ids, appending each
token, stop checks), with the GPU idle meanwhile. This bench measures that part alone, on the CPU: the
engine's real ``step()`` over a tiny random model whose forward is replaced by fixed logits, with the
metadata still written as a graph replay would (``graph_plan.fill_meta``). Greedy rows, no stop
strings, so the figure is the floor of what a step adds per request.

    python -m bench.host_step [--batches 1,16,64,256] [--context 256] [--steps 40] [--json]
"""

from __future__ import annotations

import json
import statistics

import click
import torch

from appliance.cli_support import HELP_OPTIONS, run_command

MODEL = "random:tiny"  # a forward that costs next to nothing, and is stubbed out anyway


def host_step_ms(batches: tuple[int, ...], context: int, steps: int) -> dict:
    """Median host ms per decode step and us per request, per batch size."""
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine
    from appliance.engine.graph_plan import TableMemo, fill_meta, plan_graphs
    from appliance.engine.runner import decode_rows
    from bench.engine_steps import decode_steps

    torch.set_num_threads(1)
    top = max(batches)
    max_len = context + steps + 16
    engine = Engine(MODEL, EngineConfig(device="cpu", dtype="float32", enable_prefix_cache=False,
                                                max_running=top, max_model_len=max_len,
                                                max_prefill_tokens=top * context,  # every prompt in one step
                                                kv_cache_mb=max(64, top * max_len // 256)))
    plan = plan_graphs(top, max_len, engine.config.page_size, engine.model_config.num_kv_heads, 132)
    meta, memo = torch.zeros(plan.buffer_len, dtype=torch.int64), TableMemo()
    real_step = engine.runner.step
    logits: dict[int, torch.Tensor] = {}

    def replay(sb, hook=None, extra=b"", scoring=()):
        if not sb.decode_only:
            return real_step(sb, hook, extra, scoring)  # the prompts' prefill: the real forward, untimed
        fill_meta(meta, plan, plan.bucket_for(len(sb.requests)), decode_rows(sb), 0, memo)  # as DecodeGraphs.run
        n = len(sb.requests)
        if n not in logits:
            logits[n] = torch.randn(n, engine.model_config.vocab_size, generator=torch.Generator().manual_seed(n))
        return logits[n]

    engine.runner.step = replay
    out: dict = {"context": context, "steps": steps}
    try:
        for b in batches:
            prompts = [[3 + (7 * i + 11 * j) % 250 for j in range(context)] for i in range(b)]
            ms = statistics.median(decode_steps(engine, prompts, steps)) * 1000
            out[f"host_ms_b{b}"] = round(ms, 4)
            out[f"host_us_per_request_b{b}"] = round(1000 * ms / b, 2)
    finally:
        engine.shutdown()
    return out


@click.command(context_settings=HELP_OPTIONS)
@click.option("--batches", default="1,16,64,256", help="decode batch sizes")
@click.option("--context", type=int, default=256, help="prompt tokens of each request")
@click.option("--steps", type=int, default=40, help="timed decode steps per batch size")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object only")
def command(batches: str, context: int, steps: int, as_json: bool) -> None:
    from appliance.model.random_model import parse_spec

    sizes = tuple(int(x) for x in batches.split(","))
    if not sizes or min(sizes) < 1 or context < 1 or steps < 1:
        raise click.BadParameter("batches, --context and --steps must be >= 1")
    room = parse_spec(MODEL).max_position
    if context + steps + 16 > room:
        raise click.BadParameter(f"--context + --steps + 16 must fit {MODEL}'s {room} positions, "
                                 f"got {context + steps + 16}")
    result = host_step_ms(sizes, context, steps)
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:26s} {v}")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.host_step ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.host_step")


if __name__ == "__main__":
    raise SystemExit(main())

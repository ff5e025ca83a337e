"""Engine throughput on this machine: decode at batch 1 and 16, long-context decode, prefill tokens/s.

    python -m bench.engine [--json] [--threads N] [--dtype bfloat16] [--steps 48] [--model PATH]

Medians over timed steps, prefix cache off (no accidental hits). Same engine code path as serving.
Long-context decode: ``--long-batch`` requests whose contexts are the ``--prefill-len`` prompt decode
together (what a decode engine does with RAG answers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _decode_steps(engine, prompts: list[list[int]], steps: int) -> list[float]:
    from appliance.engine.request import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while any(not r.output_ids for r in reqs):  # prefill everything first
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for r in reqs:
        engine.abort(r.request_id)
    return times


def _prefill_times(engine, prompt: list[int], repeats: int) -> list[float]:
    from appliance.engine.request import SamplingParams

    times = []
    for _ in range(repeats):
        req = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        t0 = time.perf_counter()
        while not req.is_finished:
            engine.step()
        times.append(time.perf_counter() - t0)
    return times


def run(model: str | None, threads: int, dtype: str, steps: int, prefill_len: int, long_batch: int = 6) -> dict:
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine

    torch.set_num_threads(threads)
    cfg = EngineConfig(dtype=dtype, threads=threads, enable_prefix_cache=False, max_prefill_tokens=prefill_len,
                       kv_cache_mb=512)
    engine = Engine(model, cfg)
    tok = engine.tokenizer
    base = tok.encode("Write a long story about a lighthouse keeper who finds a message in a bottle. " * 4)[:64]
    _decode_steps(engine, [base], 8)  # warm-up
    b1 = _decode_steps(engine, [base], steps)
    b16 = _decode_steps(engine, [base + [100 + i] for i in range(16)], steps)
    text = " ".join(f"Sentence number {i} talks about the weather, the sea and the mountains." for i in range(200))
    long_prompt = tok.encode(text)[:prefill_len]
    _prefill_times(engine, long_prompt[:128], 1)
    pre = _prefill_times(engine, long_prompt, 3)
    long_steps = _decode_steps(engine, [long_prompt[:-1] + [100 + i] for i in range(long_batch)], max(8, steps // 2))
    engine.shutdown()
    ms_b1 = statistics.median(b1) * 1000
    step16 = statistics.median(b16)
    return {
        "model": engine.model_name, "dtype": dtype, "threads": threads, "cpu_count": os.cpu_count(),
        "decode_ms_per_token_b1": round(ms_b1, 2),
        "decode_tok_s_b1": round(1000 / ms_b1, 1),
        "decode_ms_per_step_b16": round(step16 * 1000, 2),
        "decode_tok_s_b16": round(16 / step16, 1),
        "b16_over_b1": round((16 / step16) / (1000 / ms_b1), 2),
        f"decode_ms_per_step_b{long_batch}_ctx{len(long_prompt)}": round(statistics.median(long_steps) * 1000, 2),
        "prefill_tokens": len(long_prompt),
        "prefill_s": round(statistics.median(pre), 3),
        "prefill_tok_s": round(len(long_prompt) / statistics.median(pre), 1),
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--prefill-len", type=int, default=1024)
    p.add_argument("--long-batch", type=int, default=6, help="requests in the long-context decode figure")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    args = p.parse_args(argv)
    result = run(args.model, args.threads, args.dtype, args.steps, args.prefill_len, args.long_batch)
    if args.json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pdbox engine, {result['model']} {result['dtype']}, {result['threads']} threads")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, str(v))
    Console().print(table)


if __name__ == "__main__":
    main()

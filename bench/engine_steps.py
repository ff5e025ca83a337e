"""Timing an engine: the decode-step loop the CPU and GPU engine benches share, and a median timer."""

from __future__ import annotations

import statistics
import time


def median_s(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_steps(engine, prompts: list[list[int]], steps: int) -> list[float]:
    """Wall seconds of each of ``steps`` decode steps of ``prompts`` together (prefilled first, untimed).
    A step returns once its sampled ids are on the host, so on a GPU the clock covers the device work.
    Every timed step decodes every request: one that would finish first (EOS is ignored; the length
    limit is the context's, since early requests decode while later ones prefill) is an error."""
    from appliance.engine.request import SamplingParams

    params = SamplingParams(max_tokens=engine.max_model_len, temperature=0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    try:
        while any(not r.output_ids for r in reqs):  # prefill everything first
            engine.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = engine.step()
            times.append(time.perf_counter() - t0)
            if len(out) != len(reqs):
                raise RuntimeError(f"a timed step decoded {len(out)} of {len(reqs)} requests: the context "
                                   f"({engine.max_model_len} tokens) or the KV cache is too small for the run")
    finally:
        for r in reqs:
            engine.abort(r.request_id)
    return times

"""``python -m bench.engine --device cuda``: decode ms/step and prefill tok/s beside the GPU's floors.

Floors are measured in the same run: a decode step reads every weight once plus the batch's KV
(bytes / the device-to-device copy bandwidth of a 2 GB buffer, read + write bytes counted), a
prefill runs 2 x linear params FLOPs per token plus causal attention (FLOPs / the rate of an
8192^3 bf16 ``torch.matmul``). Decode is timed with CUDA graphs on and off (off: the eager step).

Where a step's wall time goes: ``decode_gpu_ms_b*`` times the graph replay alone on the device
(the rest of the wall time is the host's: scheduling, metadata, reading the sampled ids), and
``--profile`` adds, for the first batch size (``--profile-batches 1,64``: those sizes), the kernels of
one replayed and one eager step from the profiler (device time and calls per step, the largest first;
``gaps_us`` = replay time - the kernels' busy time, the launch gaps a graph leaves).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.engine_steps import decode_steps


def _cuda_ms(fn, repeats: int) -> float:
    """Median ms of ``fn`` on the current stream, timed with events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_gb_s(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth: (read + write bytes) / time of one ``copy_``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _cuda_ms(lambda: dst.copy_(src), 10)
    return 2 * nbytes / ms / 1e6


def matmul_tflop_s(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = _cuda_ms(lambda: torch.matmul(a, b), 20)
    return 2 * n**3 / ms / 1e9


def _weights(model) -> tuple[int, int, int, int]:
    """(bytes, params) of the linear weights a decode step reads (every layer's and the LM head), the LM
    head's params (a prefill runs it on its sampled rows only), and the checkpoint's bytes (the embedding
    table as well, where it is not the LM head's: a step reads only its batch's rows of it)."""
    ws = [w for lw in model.layers for w in (lw.qkv, lw.o_proj, lw.gate_up, lw.down)] + [model.lm_head]
    params = sum(int(torch.Size(w.shape).numel()) for w in ws)
    head = int(torch.Size(model.lm_head.shape).numel())
    elem = torch.empty(0, dtype=model.dtype).element_size()
    embed = 0 if model.embed.data_ptr() == model.lm_head.data_ptr() else int(model.embed.numel())
    return params * elem, params, head, (params + embed) * elem


def _decode_prompts(b: int, context: int) -> list[list[int]]:
    """``b`` distinct prompts of ``context`` tokens: a decode batch's rows (the timings' and the profiles')."""
    return [[3 + (7 * i + 11 * j) % 250 for j in range(context)] for i in range(b)]


def _decode_ms(engine, prompts: list[list[int]], steps: int, graphs: bool) -> float:
    """Median wall ms of a decode-only engine step (host sampling included) over ``steps`` steps."""
    runner = engine.runner
    saved = runner.decode_graphs
    runner.decode_graphs = saved if graphs else None
    try:
        times = decode_steps(engine, prompts, steps + 1)[1:]  # the first decode step is a warm-up
    finally:
        runner.decode_graphs = saved
    return statistics.median(times) * 1000


def covered_us(spans) -> float:
    """The time ``spans`` ((start, end) pairs) cover, overlaps once: with PDL a kernel's blocks start while
    the one before drains and wait at `griddepcontrol.wait`, so kernels' own times add up past the wall."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kernel_profile(fn, steps: int = 5, top: int = 20) -> dict:
    """The kernels ``fn`` runs on the device, per call: busy us (their times summed), covered us (the time
    some kernel ran; less than busy where they overlapped), kernel count, the ``top`` by device time (a
    kernel launched with PDL includes the wait for the one before)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                  key=lambda e: -e.self_device_time_total)
    busy = sum(e.self_device_time_total for e in rows) / steps
    out = {"busy_us": round(busy, 1), "kernels": round(sum(e.count for e in rows) / steps, 1),
           "top": [{"name": e.key[:100], "us": round(e.self_device_time_total / steps, 1),
                    "calls": round(e.count / steps, 1)} for e in rows[:top]]}
    try:
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
        out["covered_us"] = round(covered_us(spans) / steps, 1)
        out["overlap_us"] = round(busy - out["covered_us"], 1)
    except (AttributeError, TypeError) as e:  # a profiler without per-event times: the sums alone
        out["covered_error"] = f"{type(e).__name__}: {e}"
    return out


def _replay_ms(engine, b: int, steps: int) -> float:
    """Device ms of batch ``b``'s graph replay alone. Right after a step of ``b`` requests: every bucket's
    graph reads one metadata buffer, laid out by the last step for its own bucket."""
    graphs = engine.runner.decode_graphs
    return _cuda_ms(graphs.graphs[graphs.plan.bucket_for(b)].replay, steps)


def _replay_profile(engine, prompts: list[list[int]], replay_ms: float) -> dict:
    """Batch ``len(prompts)``'s kernels, replayed from its graph and run eagerly on the same buffers (two
    real steps of those prompts first: the buffer in that bucket's layout). After every timed figure: a
    profiler session after graph capture could fault the CUDA context, which would end the run."""
    b = len(prompts)
    graphs = engine.runner.decode_graphs
    bucket = graphs.plan.bucket_for(b)
    out: dict = {}
    try:
        decode_steps(engine, prompts, 2)
        prof = kernel_profile(graphs.graphs[bucket].replay)
        prof["gaps_us"] = round(replay_ms * 1000 - prof.get("covered_us", prof["busy_us"]), 1)
        out[f"profile_b{b}_graphs"] = prof
        out[f"profile_b{b}_eager"] = kernel_profile(lambda: graphs.eager(bucket))
    except Exception as e:  # a profiler that cannot start here must not cost the figures
        out[f"profile_b{b}_error"] = f"{type(e).__name__}: {e}"
    return out


def _prefill_s(engine, prompt: list[int], repeats: int) -> float:
    from appliance.engine.request import SamplingParams

    times = []
    for i in range(repeats + 1):
        ids = [(prompt[0] + i) % 250 + 3] + prompt[1:]  # distinct first token: never a prefix hit
        req = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while not req.is_finished:
            engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def run_cuda(model: str, dtype: str = "bfloat16", batches: tuple[int, ...] = (1, 16, 64, 256),
             prefill_lens: tuple[int, ...] = (1024, 8192), context: int = 512, steps: int = 20,
             graphs: bool = True, kv_cache_mb: int = 0, out_path: str | None = None,
             profile: tuple[int, ...] = ()) -> dict:
    """All figures in one dict; with ``out_path`` it is rewritten after each figure, so a run cut short
    by a timeout still leaves what it measured."""
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine
    from kernels._triton import autotune_enabled, pdl_enabled

    if not torch.cuda.is_available():
        raise SystemExit("bench.engine --device cuda: no CUDA device")
    max_len = max(max(prefill_lens), context + steps + 8) + 16
    if not kv_cache_mb:
        from appliance.model.random_model import is_random_spec, parse_spec

        if is_random_spec(model):
            s = parse_spec(model)
            elem = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            per_token = 2 * s.layers * s.kv_heads * s.head_dim * elem
            tokens = max(batches) * (context + steps + 24) + max_len + 4096
            kv_cache_mb = int(per_token * tokens * 1.1 / 2**20) + 64
        else:
            kv_cache_mb = 16384
    t0 = time.perf_counter()
    cfg = EngineConfig(device="cuda", dtype=dtype, enable_prefix_cache=False, max_prefill_tokens=max(prefill_lens),
                       kv_cache_mb=kv_cache_mb, max_running=max(batches), max_model_len=max_len, cuda_graphs=graphs,
                       cuda_graph_batches=tuple(batches))  # only the measured sizes: fewer start-up compiles
    engine = Engine(model, cfg)
    start_s = time.perf_counter() - t0
    mc = engine.model_config
    copy = copy_gb_s()
    tflops = matmul_tflop_s()
    weight_bytes, params, head_params, checkpoint_bytes = _weights(engine.runner.model)
    kv_elem = engine.pool.kv.element_size()
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * kv_elem
    out: dict = {"model": engine.model_name, "dtype": cfg.dtype, "backend": engine.runner.backend.name,
                 "device": torch.cuda.get_device_name(), "autotune": autotune_enabled(), "pdl": pdl_enabled(),
                 "startup_s": round(start_s, 1), "warmup_s": round(engine.warmup_s, 1),
                 "copy_gb_s": round(copy, 1), "matmul_tflop_s": round(tflops, 1),
                 # the decode floors' bytes: every linear weight and the LM head, not the embedding table
                 # (a step reads its batch's rows of it), which the checkpoint's size counts
                 "weight_gb": round(weight_bytes / 1e9, 3), "weight_gb_checkpoint": round(checkpoint_bytes / 1e9, 3),
                 "context": context, "steps": steps,
                 # cuBLAS against pdbox's GEMV per weight kind and row count, as the warm-up measured them
                 "linear_choice": [asdict(t) | {"gemv": t.gemv_wins} for t in engine.runner.linear_timings]}

    def save() -> None:
        if out_path:
            Path(out_path).write_text(json.dumps(out, indent=1))

    save()
    # prefill first: its few timed steps are the cheapest figures if a timeout cuts the run short
    for n in prefill_lens:
        prompt = [3 + (13 * j) % 250 for j in range(n)]
        s = _prefill_s(engine, prompt, 2)
        # every token through the layers, the LM head on the one sampled row, causal QK^T + PV
        attention = 2 * mc.num_layers * mc.num_heads * mc.head_dim * n * n
        flops = 2 * (params - head_params) * n + 2 * head_params + attention
        out[f"prefill_tok_s_{n}"] = round(n / s, 1)
        out[f"prefill_floor_tok_s_{n}"] = round(n / (flops / (tflops * 1e12)), 1)
        out[f"prefill_share_of_matmul_{n}"] = round(flops / s / 1e12 / tflops, 3)
        save()
    for b in batches:
        prompts = _decode_prompts(b, context)
        floor = (weight_bytes + b * (context + 2) * kv_per_token) / copy / 1e6
        out[f"decode_floor_ms_b{b}"] = round(floor, 3)
        modes = (True, False) if engine.runner.decode_graphs is not None else (False,)
        for g in modes:
            ms = _decode_ms(engine, prompts, steps, g)
            tag = "graphs" if g else "eager"
            out[f"decode_ms_b{b}_{tag}"] = round(ms, 3)
            out[f"decode_over_floor_b{b}_{tag}"] = round(ms / floor, 2)
            save()
        if len(modes) == 2:
            out[f"graph_speedup_b{b}"] = round(out[f"decode_ms_b{b}_eager"] / out[f"decode_ms_b{b}_graphs"], 2)
        if len(modes) == 2 and engine.runner.decode_graphs.graphs:  # captured (none after a failed capture)
            out[f"decode_gpu_ms_b{b}"] = round(_replay_ms(engine, b, steps), 3)
            out[f"decode_gpu_over_floor_b{b}"] = round(out[f"decode_gpu_ms_b{b}"] / floor, 2)
            save()
    for b in (b for b in profile if f"decode_gpu_ms_b{b}" in out):
        out.update(_replay_profile(engine, _decode_prompts(b, context), out[f"decode_gpu_ms_b{b}"]))
        save()
    engine.shutdown()
    out["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    return out

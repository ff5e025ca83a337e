"""Engine throughput on this machine: decode at batch 1 and 16, long-context decode, prefill tokens/s.

    python -m bench.engine [--json] [--threads N] [--dtype auto] [--backend auto] [--steps 48] [--model PATH]

Medians over timed steps, prefix cache off (no accidental hits). Same engine code path as serving.
Long-context decode: ``--long-batch`` requests whose contexts are the ``--prefill-len`` prompt decode
together (what a decode engine does with RAG answers). The prompt prefills in one step, or in chunks of
``--prefill-chunk`` tokens each over the cached rest, as a server does (``--max-prefill-tokens``: 256 on CPU).

Beside each figure, the floor this machine allows, measured in the same run through the engine's own
linear layers: a batch-1 decode step reads every weight once (bytes / the bandwidth of one GEMV over
a weight as large as the whole model), a prefill runs 2 x params FLOPs per token (at the GEMM rate of
a prefill-shaped layer). Where a GGUF's 4-bit weights run packed (``--q4-kernels``, the engine's default),
the step reads their codes and scales instead: ``decode_floor_ms`` counts those bytes,
``decode_floor_ms_dense`` every weight in the engine's dtype.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import click
import torch

from appliance.cli_support import HELP_OPTIONS, run_command
from bench.engine_steps import decode_steps as _decode_steps
from bench.engine_steps import median_s


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


def floors(engine, prefill_chunk: int) -> dict:
    """Weight bytes per decode step, FLOPs per prefill token, and the rates this machine gives them."""
    model = engine.runner.model
    be = model.backend
    layer = model.layers[0]
    weights = [w for lw in model.layers for w in (lw.qkv, lw.o_proj, lw.gate_up, lw.down)] + [model.lm_head]

    def numel(w) -> int:
        return int(torch.Size(w.shape).numel())

    elem = torch.empty(0, dtype=model.dtype).element_size()

    def read_bytes(w) -> int:  # what a batch-1 step reads of it: the 4-bit codes and scales where it has them
        quant, int4 = getattr(w, "quant", None), getattr(w, "int4", None)
        if quant is not None:
            return quant.nbytes
        return numel(w) * elem if int4 is None else sum(t.nbytes for t in int4)

    dense_bytes = sum(numel(w) for w in weights) * elem
    weight_bytes = sum(read_bytes(w) for w in weights)
    hidden = model.cfg.hidden_size
    # NOTE: the GEMV rate is read off one weight as large as the whole model, packed as the engine
    # packs its own: a step streams every byte from memory, while a single layer's weight (even the
    # 57 MB head) sits partly in a 32 MB L3 when timed again and again (it read 38-66 GB/s, the
    # model-sized one 31).
    big_rows = dense_bytes // (hidden * elem)
    big = be.pack_linear(torch.randn(big_rows, hidden, dtype=model.dtype))
    with torch.inference_mode():
        x1 = torch.randn(1, hidden)
        gemv_s = median_s(lambda: be.linear(x1, big), 10)
        xp = torch.randn(prefill_chunk, hidden)
        gemm_s = median_s(lambda: be.linear(xp, layer.gate_up), 5)
    gemv_gbs = big_rows * hidden * elem / gemv_s / 1e9
    gemm_flops = 2 * prefill_chunk * numel(layer.gate_up) / gemm_s
    layer_params = sum(numel(w) for w in weights[:-1])
    return {"weight_mb_per_token": round(weight_bytes / 1e6, 1), "gemv_gb_s": round(gemv_gbs, 2),
            "decode_floor_ms": round(weight_bytes / gemv_gbs / 1e6, 2),
            "decode_floor_ms_dense": round(dense_bytes / gemv_gbs / 1e6, 2),
            "gemm_gflop_s": round(gemm_flops / 1e9, 1),
            "prefill_floor_tok_s": round(gemm_flops / (2 * layer_params), 1)}


def _q4_kernel(model) -> str:
    """Which kernel decode reads a GGUF's quantized weights with: pdbox's, torch's int4, or none."""
    w = model.layers[0].gate_up
    if getattr(w, "quant", None) is not None:
        return "pdbox-quant (AVX2, int16 rows)"
    return "torch-int4 (bf16 rows)" if getattr(w, "int4", None) is not None else "none (the float weights)"


def _native_kernels(backend: object) -> str:
    """Which of pdbox's C kernels the engine could run (bf16's on AVX-512 BF16, fp32's on AVX2), and why not."""
    if not hasattr(backend, "native_attention"):
        return "off (not the cpu backend)"
    reason = "--no-native-kernels" if backend.native_reason == "off" else backend.native_reason
    bf16 = "on" if backend.native_attention else f"off ({reason})"
    f32 = "on" if backend.native_pointwise_f32 and backend.native_decode_f32 else "off"
    layer = "on" if backend.native_decode_layer else "off"
    layer16 = "on" if getattr(backend, "native_decode_layer_bf16", False) else "off"
    return f"bf16: {bf16}, a decode layer a call: {layer16}; fp32 (AVX2): {f32}, a decode layer a call: {layer}"


def prompt_tokens(tok, n: int) -> list[int]:
    """The prefill figure's prompt: ``n`` tokens of numbered sentences (~16 tokens each, so long enough for
    any ``n``; the first 200 sentences are the text every earlier run used)."""
    text = " ".join(f"Sentence number {i} talks about the weather, the sea and the mountains."
                    for i in range(max(200, n // 8)))
    return tok.encode(text)[:n]


def run(model: str | None, threads: int, dtype: str, steps: int, prefill_len: int, long_batch: int = 6,
        backend: str = "auto", q4_kernels: bool = True, native_kernels: bool = True, prefill_chunk: int = 0,
        decode_batches: tuple[int, ...] = (), layer_max_rows: int | None = None) -> dict:
    from appliance.config import EngineConfig
    from appliance.engine.engine import Engine

    torch.set_num_threads(threads)
    cfg = EngineConfig(dtype=dtype, threads=threads, enable_prefix_cache=False,
                       max_prefill_tokens=prefill_chunk or prefill_len,
                       kv_cache_mb=512, attention_backend=backend, q4_kernels=q4_kernels,
                       native_kernels=native_kernels)
    engine = Engine(model, cfg)
    be = engine.runner.backend
    if layer_max_rows is not None and hasattr(be, "layer_max_rows"):  # the one-call decode layers' bound, moved
        be.layer_max_rows[engine.runner.model.dtype] = layer_max_rows
    tok = engine.tokenizer
    base = tok.encode("Write a long story about a lighthouse keeper who finds a message in a bottle. " * 4)[:64]
    _decode_steps(engine, [base], 8)  # warm-up
    b1 = _decode_steps(engine, [base], steps)
    b16 = _decode_steps(engine, [base + [100 + i] for i in range(16)], steps)
    more = {n: _decode_steps(engine, [base + [100 + i] for i in range(n)], steps) for n in decode_batches}
    long_prompt = prompt_tokens(tok, prefill_len)
    _prefill_times(engine, long_prompt[:128], 1)
    pre = _prefill_times(engine, long_prompt, 3)
    long_steps = _decode_steps(engine, [long_prompt[:-1] + [100 + i] for i in range(long_batch)], max(8, steps // 2))
    floor = floors(engine, min(prefill_len, 256))
    engine.shutdown()
    ms_b1 = statistics.median(b1) * 1000
    step16 = statistics.median(b16)
    prefill_tok_s = len(long_prompt) / statistics.median(pre)
    return {
        "model": engine.model_name, "dtype": cfg.dtype, "backend": engine.runner.backend.name, "threads": threads,
        "q4_kernels": q4_kernels,
        "q4_kernel": _q4_kernel(engine.runner.model),
        "native_kernels": _native_kernels(engine.runner.backend),
        "cpu_count": os.cpu_count(),
        "decode_ms_per_token_b1": round(ms_b1, 2),
        "decode_floor_ms": floor["decode_floor_ms"],
        "decode_over_floor": round(ms_b1 / floor["decode_floor_ms"], 2),
        "decode_floor_ms_dense": floor["decode_floor_ms_dense"],
        "decode_over_dense_floor": round(ms_b1 / floor["decode_floor_ms_dense"], 2),
        "decode_tok_s_b1": round(1000 / ms_b1, 1),
        "decode_ms_per_step_b16": round(step16 * 1000, 2),
        "decode_tok_s_b16": round(16 / step16, 1),
        "b16_over_b1": round((16 / step16) / (1000 / ms_b1), 2),
        **{f"decode_ms_per_step_b{n}": round(statistics.median(t) * 1000, 2) for n, t in more.items()},
        **({"layer_max_rows": be.layer_max_rows[engine.runner.model.dtype]} if hasattr(be, "layer_max_rows") else {}),
        f"decode_ms_per_step_b{long_batch}_ctx{len(long_prompt)}": round(statistics.median(long_steps) * 1000, 2),
        "prefill_tokens": len(long_prompt),
        "prefill_chunk": cfg.max_prefill_tokens,
        "prefill_s": round(statistics.median(pre), 3),
        "prefill_tok_s": round(prefill_tok_s, 1),
        "prefill_floor_tok_s": floor["prefill_floor_tok_s"],
        "prefill_share_of_floor": round(prefill_tok_s / floor["prefill_floor_tok_s"], 2),
        "weight_mb_per_token": floor["weight_mb_per_token"],
        "gemv_gb_s": floor["gemv_gb_s"],
        "gemm_gflop_s": floor["gemm_gflop_s"],
        "steps": steps,
    }


@click.command(help=__doc__.splitlines()[0], context_settings=HELP_OPTIONS)
@click.option("--model", default=None)
@click.option("--threads", type=int, default=len(os.sched_getaffinity(0)))
@click.option("--dtype", default="auto", type=click.Choice(("auto", "float32", "bfloat16", "float16")))
@click.option("--backend", default="auto", type=click.Choice(("auto", "cpu", "torch", "triton")),
              help="kernels: cpu (fast CPU path), torch (the references), triton")
@click.option("--steps", type=int, default=48)
@click.option("--q4-kernels/--no-q4-kernels", default=True,
              help="CPU: decode reads a GGUF's 4-bit weights packed (the engine's default)")
@click.option("--native-kernels/--no-native-kernels", default=True,
              help="CPU, bf16: attention and pointwise ops in pdbox's C kernels (the engine's default), else torch's")
@click.option("--prefill-len", type=int, default=1024)
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=0,
              help="prefill in chunks of this many tokens, as a server does (0: the whole prompt in one step)")
@click.option("--long-batch", type=int, default=6, help="requests in the long-context decode figure")
@click.option("--decode-batches", default="", help="CPU: decode ms/step at these batch sizes too (e.g. 4,5,6,8)")
@click.option("--layer-max-rows", type=click.IntRange(0, 16), default=None,
              help="CPU: decode steps of up to this many rows run a call a layer (default: the engine's own bound)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object only")
@click.option("--device", default="cpu", type=click.Choice(("cpu", "cuda")),
              help="cuda: decode at batch 1/16/64/256 (graphs on and off), prefill 1K/8K, GPU floors "
                   "(bench.engine_gpu; --steps defaults to 20 there)")
@click.option("--context", type=int, default=512, help="cuda: prompt tokens of each decoding request")
@click.option("--batches", default="1,16,64,256", help="cuda: decode batch sizes")
@click.option("--prefill-lens", default="1024,8192", help="cuda: prefill lengths")
@click.option("--no-cuda-graphs", is_flag=True, help="cuda: eager decode only")
@click.option("--out", default=None, help="cuda: also write the JSON here, after every figure")
@click.option("--profile", is_flag=True, help="cuda: the kernels of one decode step at the first batch size "
                                              "(graph replay and eager), from torch's profiler")
@click.option("--profile-batches", default="", help="cuda: profile these batch sizes instead (e.g. 1,64)")
def command(model: str | None, threads: int, dtype: str, backend: str, steps: int, q4_kernels: bool,
            native_kernels: bool, prefill_len: int, prefill_chunk: int, long_batch: int, decode_batches: str,
            layer_max_rows: int | None, as_json: bool, device: str,
            context: int,
            batches: str, prefill_lens: str, no_cuda_graphs: bool, out: str | None, profile: bool,
            profile_batches: str) -> None:
    if device == "cuda":
        from bench.engine_gpu import run_cuda

        sizes = tuple(int(x) for x in batches.split(","))
        profiled = tuple(int(x) for x in profile_batches.split(",") if x) or (sizes[:1] if profile else ())
        result = run_cuda(model or "random:llama-1b", "bfloat16" if dtype == "auto" else dtype, sizes,
                          tuple(int(x) for x in prefill_lens.split(",")), context,
                          20 if steps == 48 else steps, graphs=not no_cuda_graphs, out_path=out, profile=profiled)
    else:
        result = run(model, threads, dtype, steps, prefill_len, long_batch, backend, q4_kernels, native_kernels,
                     prefill_chunk, tuple(int(x) for x in decode_batches.split(",") if x), layer_max_rows)
    if as_json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pdbox engine, {result['model']} {result['dtype']}, "
                        f"{result.get('threads', result.get('device'))}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, str(v))
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.engine ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.engine")


if __name__ == "__main__":
    sys.exit(main())

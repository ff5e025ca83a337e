"""How the CPU backend's linear layers scale with the rows of their input, over cold weights.

    python -m bench.linear_rows [--threads N] [--dtype bfloat16] [--rows 1,2,3,4,5,6,8,16] [--model PATH]
                                [--no-native-kernels]

Times the linear layers of one forward step (every layer's weights, packed as the engine packs
them, read once per step in the engine's order) at each row count, through the engine's own
``linear``, through the raw oneDNN call on the dense weights without the backend's padding of few rows,
and, for a GGUF's quantized weights, through the kernel the engine packed them for (pdbox's AVX2
kernel, or with ``--no-native-kernels`` or where it cannot be built torch's int4 kernel), medians.
"""

from __future__ import annotations

import os
import sys

import click
import torch

from appliance.cli_support import HELP_OPTIONS, run_command
from bench.engine_steps import median_s


def run(model: str | None, threads: int, dtype: str, rows: list[int], native_kernels: bool = True) -> list[dict]:
    from appliance.config import EngineConfig
    from appliance.engine.attention_cpu import PackedWeight, int4_linear
    from appliance.engine.engine import Engine
    from kernels.cpu.quant_gemv import MAX_ROWS, quant_linear

    torch.set_num_threads(threads)
    engine = Engine(model, EngineConfig(dtype=dtype, threads=threads, kv_cache_mb=64, attention_backend="cpu",
                                        native_kernels=native_kernels))
    m = engine.runner.model
    be = m.backend
    layers = [(lw.qkv, lw.o_proj, lw.gate_up, lw.down) for lw in m.layers]
    hidden, inner = m.cfg.hidden_size, layers[0][3].shape[1]

    def step(call, x: torch.Tensor, xi: torch.Tensor) -> None:
        for qkv, o, gate_up, down in layers:
            call(x, qkv), call(x, o), call(x, gate_up), call(xi, down)

    def raw(a: torch.Tensor, w) -> torch.Tensor:
        if isinstance(w, PackedWeight):
            return torch.ops.mkldnn._linear_pointwise(a, w.packed, None, "none", [], "")
        return torch.nn.functional.linear(a, w)

    def four_bit(a: torch.Tensor, w: PackedWeight) -> torch.Tensor:
        return quant_linear(a.float(), w.quant, threads) if w.quant is not None else int4_linear(a, w.int4)

    packed = [w for ws in layers for w in ws if isinstance(w, PackedWeight)]
    kernel = ("pdbox-quant" if packed and all(w.quant is not None for w in packed) else
              "torch-int4" if packed and all(w.int4 is not None for w in packed) else None)

    out = []
    with torch.inference_mode():
        for n in rows:
            x, xi = torch.randn(n, hidden, dtype=m.dtype), torch.randn(n, inner, dtype=m.dtype)
            out.append({"rows": n, "engine_ms": round(median_s(lambda: step(be.linear, x, xi), 9) * 1e3, 2),  # noqa: B023
                        "unpadded_ms": round(median_s(lambda: step(raw, x, xi), 9) * 1e3, 2),  # noqa: B023
                        "q4_kernel": kernel,
                        "q4_ms": (round(median_s(lambda: step(four_bit, x, xi), 9) * 1e3, 2)  # noqa: B023
                                  if kernel == "torch-int4" or (kernel and n <= MAX_ROWS) else None)})
    engine.shutdown()
    return out


def _row_counts(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        rows = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give row counts as integers, comma-separated (e.g. 1,2,4)") from None
    if any(r < 1 for r in rows):
        raise click.BadParameter(f"{value!r}: every row count must be at least 1")
    return rows


@click.command(help=__doc__.splitlines()[0], context_settings=HELP_OPTIONS)
@click.option("--model", default=None)
@click.option("--threads", type=int, default=len(os.sched_getaffinity(0)))
@click.option("--dtype", default="auto", type=click.Choice(("auto", "float32", "bfloat16")))
@click.option("--rows", default="1,2,3,4,5,6,8,16", callback=_row_counts, help="row counts, comma-separated")
@click.option("--native-kernels/--no-native-kernels", default=True,
              help="quantized weights in pdbox's AVX2 kernel (the engine's default), else torch's int4 kernel")
def command(model: str | None, threads: int, dtype: str, rows: list[int], native_kernels: bool) -> None:
    for r in run(model, threads, dtype, rows, native_kernels):
        int4 = "" if r["q4_ms"] is None else f", {r['q4_kernel']} {r['q4_ms']:7.2f} ms"
        print(f"rows {r['rows']:3d}: engine linear {r['engine_ms']:7.2f} ms, "
              f"unpadded oneDNN {r['unpadded_ms']:7.2f} ms{int4} ({threads} threads, one step's layers)")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.linear_rows ARGS``; returns the exit status (2: a bad option)."""
    return run_command(command, argv, "python -m bench.linear_rows")


if __name__ == "__main__":
    sys.exit(main())

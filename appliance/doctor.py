"""`pdbox doctor`: what this machine offers (devices, KV transports, kernels) and why anything is passed over."""

from __future__ import annotations

import os
import platform

# what each library serves, for the report's lines
KERNEL_USE = {"attention": "CPU bf16", "pointwise": "CPU bf16", "quant_gemv": "CPU, a GGUF's 4- and 8-bit weights",
              "pointwise_f32": "CPU fp32", "decode_f32": "CPU fp32", "extend_f32": "CPU fp32, prefill attention",
              "decode_layer_f32": "CPU fp32, a decode layer a call",
              "decode_layer_bf16": "CPU bf16, a decode layer a call"}


def native_kernels() -> dict:
    """pdbox's C kernels for the CPU backend (attention and pointwise in bf16 on AVX-512 BF16; the GEMV on a
    GGUF's 4- and 8-bit blocks in any dtype, fp32 pointwise ops, decode and prefill attention and the one-call
    decode layer on AVX2; the bf16 one-call decode layer on AVX-512 BF16): built and loaded here, or why not."""
    import torch

    from kernels.cpu.decode_layer import native as decode_layer
    from kernels.cpu.flash_decode import native_f32 as decode_f32
    from kernels.cpu.flash_extend import native as attention
    from kernels.cpu.flash_extend import native_f32 as extend_f32
    from kernels.cpu.pointwise import native as pointwise
    from kernels.cpu.quant_gemv import native as quant_gemv

    built = {"attention": attention(), "pointwise": pointwise(), "quant_gemv": quant_gemv(),
             "pointwise_f32": pointwise(torch.float32), "decode_f32": decode_f32(), "extend_f32": extend_f32(),
             "decode_layer_f32": decode_layer(), "decode_layer_bf16": decode_layer(torch.bfloat16)}
    return {name: {"ok": b.lib is not None, "reason": b.reason, "path": str(b.path) if b.path else None}
            for name, b in built.items()}


def report() -> dict:
    import torch

    import nvshmem_kv
    from appliance.cpu_load import sample_busy
    from appliance.engine.dtype import cpu_has_native_bf16, default_dtype
    from kernels import HAS_TRITON, interpreter_enabled

    cuda = torch.cuda.is_available()
    cores = sorted(os.sched_getaffinity(0))
    devices = {
        "cpu": {"cores": cores, "model": platform.processor() or platform.machine(), "bf16": cpu_has_native_bf16(),
                "busy": {c: round(f, 2) for c, f in (sample_busy(cores) or {}).items()}},  # now, by anything
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }
    device = "cuda" if cuda else "cpu"
    probe = nvshmem_kv.probe(device)
    transports = [{"backend": e.backend, "ok": e.ok, "reason": e.reason} for e in probe.entries]
    if not HAS_TRITON:
        kernel = {"backend": "torch", "reason": "triton is not installed: the torch references run everything"}
    elif cuda:
        from kernels._triton import pdl_status

        why_not = pdl_status()
        kernel = {"backend": "triton", "reason": "CUDA device present: Triton kernels compile for it",
                  "pdl": {"ok": why_not is None, "reason": why_not or "decode's kernels launch with programmatic "
                          "dependent launch (PDBOX_TRITON_PDL=0 turns it off)"}}
    else:
        kernel = {"backend": "cpu", "reason": "no CUDA device: the engine runs its CPU kernels (oneDNN linear layers; "
                  "pdbox's C attention and pointwise kernels below (bf16 on AVX-512 BF16, fp32 on AVX2), else "
                  "torch's SDPA; a GGUF's 4-/8-bit weights in pdbox's AVX2 GEMV below, else torch's int4 kernel); "
                  "Triton kernels run "
                  f"only under TRITON_INTERPRET=1 (tests){' — on now' if interpreter_enabled() else ''}"}
    kernel["dtype"] = default_dtype(device)
    kernel["native"] = native_kernels()
    try:
        from appliance.model.loader import default_model_path

        model = str(default_model_path())
    except ValueError as exc:
        model = f"missing: {exc}"
    return {"torch": torch.__version__, "devices": devices, "transport": probe.backend, "transports": transports,
            "attention_backend": kernel, "default_model": model}


def busy_text(busy: dict) -> str:
    """The cores' busy shares; those over `appliance.cpu_load.BUSY_FRACTION` would slow pdbox's engines."""
    from appliance.cpu_load import BUSY_FRACTION, busy_names

    if not busy:
        return "unknown (no /proc/stat)"
    over = busy_names(busy)
    return (over + ": other work there slows pdbox's engines several-fold; leave those cores out "
            "with --cpus") if over else f"no core over {BUSY_FRACTION:.0%}"


def render(rep: dict) -> str:
    d = rep["devices"]
    lines = [f"torch {rep['torch']}",
             f"cpu: {len(d['cpu']['cores'])} cores {d['cpu']['cores']}, bf16 instructions: {d['cpu']['bf16']}",
             f"cpu busy now (0.3 s): {busy_text(d['cpu']['busy'])}",
             f"cuda: {', '.join(d['cuda']) if d['cuda'] else 'none'}",
             f"KV transport chosen: {rep['transport']}"]
    for t in rep["transports"]:
        lines.append(f"  {'ok  ' if t['ok'] else 'skip'} {t['backend']:9s} {t['reason']}")
    k = rep["attention_backend"]
    lines.append(f"attention backend: {k['backend']} ({k['reason']}); default dtype {k['dtype']}")
    if "pdl" in k:
        lines.append(f"  {'ok  ' if k['pdl']['ok'] else 'skip'} PDL: {k['pdl']['reason']}")
    for name, n in k.get("native", {}).items():
        what = KERNEL_USE.get(name, "CPU")
        lines.append(f"  {'ok  ' if n['ok'] else 'skip'} C kernels ({name}, {what}): {n['reason']}"
                     + (f" [{n['path']}]" if n["ok"] else ""))
    lines.append(f"default model: {rep['default_model']}")
    return "\n".join(lines)

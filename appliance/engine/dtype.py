"""The engine's default dtype for a device: bf16 where the hardware computes in it, fp32 elsewhere."""

from __future__ import annotations

from kernels.cpu.build import cpu_flags

# NOTE: without these a CPU runs bf16 GEMMs through a conversion fallback: 9.5 GFLOP/s against fp32's
# ~40 on a 2-core Zen 1 (AVX2 only), so a 256-token prefill took 5.7x longer in bf16 than in fp32.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return any(f in (cpu_flags() if flags is None else flags) for f in NATIVE_BF16_CPU_FLAGS)


def default_dtype(device: str, flags: frozenset[str] | None = None) -> str:
    """``bfloat16`` on CUDA and on CPUs with bf16 instructions, ``float32`` on other CPUs."""
    if not device.startswith("cpu"):
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16(flags) else "float32"

"""Picking an attention backend by name: the references (`attention`), the fast CPU path
(`attention_cpu`) or the Triton kernels (`attention_triton`, imported only when chosen)."""

from __future__ import annotations

import torch

from appliance.engine.attention import AttentionBackend, TorchAttentionBackend


def create_backend(name: str, device: torch.device, native_kernels: bool = True) -> AttentionBackend:
    """``auto`` -> ``triton`` on CUDA, ``cpu`` otherwise. Imports the Triton path lazily.
    ``native_kernels``: the ``cpu`` backend runs bf16 attention and pointwise ops in pdbox's C kernels where
    they build."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        from appliance.engine.attention_cpu import CpuAttentionBackend

        return CpuAttentionBackend(native_kernels=native_kernels)
    if name == "triton":
        from appliance.engine.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: choose auto, cpu, torch or triton")

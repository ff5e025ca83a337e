"""Picking an attention backend by name: the references (`attention`), the fast CPU path
(`attention_cpu`) or the Triton kernels (`attention_triton`, imported only when chosen)."""

from __future__ import annotations

import torch

from appliance.engine.attention import AttentionBackend, TorchAttentionBackend


def create_backend(name: str, device: torch.device, native_attention: bool = True) -> AttentionBackend:
    """``auto`` -> ``triton`` on CUDA, ``cpu`` otherwise. Imports the Triton path lazily.
    ``native_attention``: the ``cpu`` backend's bf16 prefill runs pdbox's C kernel where it builds."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        from appliance.engine.attention_cpu import CpuAttentionBackend

        return CpuAttentionBackend(native_attention=native_attention)
    if name == "triton":
        from appliance.engine.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: choose auto, cpu, torch or triton")

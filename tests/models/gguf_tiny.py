"""Tiny GGUF files converted from a tiny transformers checkpoint folder, as llama.cpp's converter does it.

Names come from the ``gguf`` package's own tensor map (``gguf.get_tensor_name_map``), not pdbox's; the
layout changes are the converter's: Llama's q/k rows permuted for interleaved rotary, Gemma's norm weights
stored as ``1 + w``, a MoE layer's experts stacked into one 3-D tensor per projection, and Llama 3.1's
llama3 rope scaling written as a ``rope_freqs`` tensor of per-frequency divisors. Tensors stay F32.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

# gguf architecture -> (MODEL_ARCH member name, q/k permuted)
ARCHS = {"llama": ("LLAMA", True), "qwen3moe": ("QWEN3MOE", False), "gemma2": ("GEMMA2", False),
         "gemma3": ("GEMMA3", False)}


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The converter's ``rope_freqs`` for a llama3 rope: one divisor per inverse frequency."""
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...mlp.experts.{e}.gate_proj.weight`` -> one ``...mlp.experts.gate_proj.weight`` (experts, out, in)."""
    out, groups = {}, {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m is None:
            out[name] = t
        else:
            groups.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = t
    for name, parts in groups.items():
        out[name] = torch.stack([parts[e] for e in sorted(parts)])
    return out


def write_tokenizer(w: Any, folder: Path) -> None:
    """The byte-level tokenizer of ``appliance.model.tiny`` as GGUF ``gpt2`` pieces."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([])


def write_spm_tokenizer(w: Any, spm: dict) -> None:
    """A hand-made SentencePiece vocabulary as GGUF pieces: ``spm`` holds ``tokens``, ``scores``, ``types``,
    optionally ``unk`` (an id), ``add_space_prefix`` and ``model`` (``tokenizer.ggml.model``, "llama")."""
    w.add_tokenizer_model(spm.get("model", "llama"))
    w.add_tokenizer_pre("default")
    w.add_token_list(spm["tokens"])
    w.add_token_scores(spm["scores"])
    w.add_token_types(spm["types"])
    if "unk" in spm:
        w.add_unk_token_id(spm["unk"])
    if "add_space_prefix" in spm:
        w.add_add_space_prefix(spm["add_space_prefix"])


def convert(folder: Path, out: Path, arch: str, cfg: Any, extra: dict | None = None) -> Path:
    """Write ``out`` (a GGUF file of ``arch``) from the transformers folder ``folder`` whose config is ``cfg``.

    ``extra`` holds metadata the converter would write for this arch: ``gemma_pattern`` (a bool per layer:
    sliding), ``softcap_final``, ``softcap_attn``, ``rope_linear`` (factor), ``eot`` (an end-of-turn id),
    ``spm`` (a SentencePiece vocabulary written instead of the folder's byte-level one: ``write_spm_tokenizer``).
    """
    import gguf

    extra = extra or {}
    arch_member, permuted = ARCHS[arch]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_member], cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope) if arch.startswith("gemma") else rope
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if "rope_linear" in extra:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(extra["rope_linear"])
    if arch == "qwen3moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch.startswith("gemma"):
        w.add_sliding_window(cfg.sliding_window)
        if "gemma_pattern" in extra:
            w.add_sliding_window_pattern(extra["gemma_pattern"])
        if extra.get("softcap_final"):
            w.add_final_logit_softcapping(extra["softcap_final"])
        if extra.get("softcap_attn"):
            w.add_attn_logit_softcapping(extra["softcap_attn"])
    w.add_bos_token_id(cfg.bos_token_id)
    if "add_bos" in extra:
        w.add_add_bos_token(extra["add_bos"])
    w.add_eos_token_id(cfg.eos_token_id)
    if "eot" in extra:
        w.add_eot_token_id(extra["eot"])
    if "spm" in extra:
        write_spm_tokenizer(w, extra["spm"])
    else:
        write_tokenizer(w, folder)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    for name, t in _stack_experts(_hf_tensors(folder)).items():
        t = t.float()
        if permuted and name.endswith("q_proj.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif permuted and name.endswith("k_proj.weight"):
            t = permute(t, cfg.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"gguf's tensor map has no name for {name!r} ({arch})")
        w.add_tensor(new, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out

"""GGUF tensor names and layouts -> the Hugging Face names and layouts the decoder reads.

llama.cpp's converter renames every tensor, permutes Llama/Mistral q and k rows for its interleaved rotary
(Qwen and Gemma are stored in rotate-half order), stacks a MoE layer's experts into one 3-D tensor per
projection, and on Gemma renames the sandwich norms (``ffn_norm`` is the pre-FFN norm there).
"""

from __future__ import annotations

import torch

from appliance.model.errors import ModelLoadError
from appliance.model.q4_blocks import Q4Blocks
from appliance.model.q8_blocks import Q8Blocks

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate_inp": "mlp.gate",  # the MoE router
}
_GEMMA_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PERMUTED = ("llama", "mistral")  # stored in llama.cpp's interleaved rotary order
CONFIG_TENSORS = ("rope_freqs.weight",)  # read into the config, not weights


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) >= 4:
        names = _GEMMA_NAMES if arch.startswith("gemma") else _LAYER_NAMES
        base = names.get(parts[2])
        if base is None:
            raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r} for architecture {arch!r}")
        return f"model.layers.{parts[1]}.{base}.{parts[-1]}"
    base = _TOP_NAMES.get(parts[0])
    if base is None:
        raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r} for architecture {arch!r}")
    return f"{base}.{parts[-1]}"


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (interleaved rotary) back to rotate-half order."""
    rows = w.shape[0]
    tail = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail)


def add_hf_tensor(weights: dict[str, torch.Tensor], name: str, w: torch.Tensor, arch: str,
                  n_heads: int, n_kv: int) -> None:
    """Put GGUF tensor ``name`` (dequantized, in PyTorch's row-major shape) into ``weights`` under its
    Hugging Face name(s); a stacked expert tensor ``(experts, out, in)`` becomes one tensor per expert."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[2] in _EXPERTS:
        if w.dim() != 3:
            raise ModelLoadError(f"GGUF tensor {name!r} should hold stacked experts (3 dims), has shape "
                                 f"{tuple(w.shape)}")
        for e in range(w.shape[0]):
            weights[f"model.layers.{parts[1]}.mlp.experts.{e}.{_EXPERTS[parts[2]]}.{parts[-1]}"] = w[e]
        return
    heads = _permuted_heads(name, arch, n_heads, n_kv)
    if heads:
        w = unpermute_rotary(w, heads)
    weights[hf_name(name, arch)] = w


def add_hf_blocks(quant: dict[str, Q4Blocks | Q8Blocks], name: str, blocks: Q4Blocks | Q8Blocks, arch: str,
                  n_heads: int, n_kv: int) -> None:
    """Put a 2-D GGUF tensor's quantized blocks into ``quant`` under its Hugging Face name, rows in the
    same order as :func:`add_hf_tensor` puts its floats."""
    heads = _permuted_heads(name, arch, n_heads, n_kv)
    if heads:
        blocks = blocks.map_rows(lambda t: unpermute_rotary(t, heads))
    quant[hf_name(name, arch)] = blocks


def _permuted_heads(name: str, arch: str, n_heads: int, n_kv: int) -> int:
    """The head count of a q or k weight stored in llama.cpp's interleaved rotary order, else 0."""
    parts = name.split(".")
    if arch in PERMUTED and parts[0] == "blk" and len(parts) >= 4 and parts[2] in ("attn_q", "attn_k"):
        return n_heads if parts[2] == "attn_q" else n_kv
    return 0

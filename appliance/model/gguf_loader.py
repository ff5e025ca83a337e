"""Load a Llama-family GGUF file: config, dequantized weights and the tokenizer's pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from appliance.config import ModelConfig, RopeScaling
from appliance.model.errors import ModelLoadError
from appliance.model.weights import Checkpoint

# the architectures whose GGUF tensors map onto the decoder as they are (Gemma, MoE: Hugging Face folders)
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K")

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
}
_UNPERMUTED = ("qwen2", "qwen3")  # llama.cpp stores these in rotate-half order already
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        base = _LAYER_NAMES.get(parts[2])
        if base is None:
            raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{parts[1]}.{base}.{parts[-1]}"
    base = _TOP_NAMES.get(parts[0])
    if base is None:
        raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{base}.{parts[-1]}"


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (interleaved rotary) back to rotate-half order."""
    rows = w.shape[0]
    tail = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail)


def _dequantize(tensor: Any) -> torch.Tensor:
    from gguf import quants

    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TENSOR_TYPES:
        raise ModelLoadError(
            f"GGUF tensor {tensor.name!r} has unsupported type {qtype}; "
            f"pdbox reads {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    if qtype == "F32":
        arr = np.asarray(tensor.data, dtype=np.float32)
    elif qtype == "F16":
        arr = np.asarray(tensor.data, dtype=np.float16).astype(np.float32)
    else:
        arr = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    arr = np.ascontiguousarray(arr).reshape(shape)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _rope_scaling(key: Any, tensors: dict, context: int, path: Path) -> tuple[RopeScaling, int]:
    """The rope type of ``{arch}.rope.scaling.*`` (none, linear, yarn) and the context it gives."""
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{path}: per-frequency rope factors (rope_freqs, Llama 3.1's llama3 scaling in GGUF) "
                             "are not supported; serve the Hugging Face folder instead")
    kind = key("rope.scaling.type") or "none"
    factor = float(key("rope.scaling.factor", 1.0) or 1.0)
    try:
        if kind == "none":
            return RopeScaling(), context
        if kind == "linear":
            return RopeScaling("linear", factor=factor), context
        if kind == "yarn":
            original = int(key("rope.scaling.original_context_length", context))
            scaling = RopeScaling("yarn", factor=factor, original_max_position=original,
                                  beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
                                  beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)))
            return scaling, max(context, int(original * factor))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    raise ModelLoadError(f"{path}: unsupported rope scaling type {kind!r}; pdbox reads none, linear and yarn from GGUF")


def load_gguf(path: str | Path) -> Checkpoint:
    """Read a GGUF file into a :class:`Checkpoint` (weights dequantized to fp32)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/IndexError on junk
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r} in GGUF; pdbox reads {', '.join(GGUF_ARCHS)} from GGUF"
        )

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    n_heads = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_heads))
    hidden = int(key("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    vocab = list(_field(reader, "tokenizer.ggml.tokens", []))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    scaling, max_position = _rope_scaling(key, tensors, int(key("context_length", 2048)), path)
    config = ModelConfig(
        arch=arch,
        num_layers=int(key("block_count")),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=int(key("attention.key_length", key("rope.dimension_count", hidden // n_heads))),
        vocab_size=int(key("vocab_size", len(vocab))),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position=max_position,
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        rope_scaling=scaling,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
    )
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        w = _dequantize(tensor)
        # llama.cpp permutes q/k for its interleaved rotary; Qwen GGUFs are stored unpermuted.
        if arch not in _UNPERMUTED and ".attn_q." in name:
            w = unpermute_rotary(w, n_heads)
        elif arch not in _UNPERMUTED and ".attn_k." in name:
            w = unpermute_rotary(w, n_kv)
        weights[hf_name(name)] = w
    types = list(_field(reader, "tokenizer.ggml.token_type", []))
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ModelLoadError(f"{path}: tokenizer model {model_kind!r} is not supported (need gpt2 BPE)")
    return Checkpoint(
        config=config,
        weights=weights,
        vocab=vocab,
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        special_tokens=[tok for tok, kind in zip(vocab, types) if kind in (3, 4)],
        pre_tokenizer=str(_field(reader, "tokenizer.ggml.pre", "default")),
        chat_template=_field(reader, "tokenizer.chat_template"),
        name=str(_field(reader, "general.name", path.stem)),
        bos_token=vocab[int(bos)] if bos is not None and int(bos) < len(vocab) else "",
    )

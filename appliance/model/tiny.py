"""A tiny random-weight Llama written as a real Hugging Face folder, for fast tests.

Same code path as a real model: config.json + model.safetensors + tokenizer.json (byte-level BPE
over the 256 byte symbols) + tokenizer_config.json with a ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_byte_tokenizer(folder: str | Path, chat_template: str = CHATML,
                         specials: list[str] | None = None) -> int:
    """Write tokenizer.json (byte-level BPE over the 256 byte symbols after ``specials``) and
    tokenizer_config.json with ``chat_template``; return the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = SPECIALS if specials is None else specials
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return len(vocab)


def write_tiny_model(folder: str | Path, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128, arch: str = "LlamaForCausalLM",
                     tie_embeddings: bool = False, max_position: int = 512) -> Path:
    """Write the folder and return its path. ``arch="Qwen2ForCausalLM"`` adds q/k/v biases."""
    from safetensors.torch import save_file

    folder = Path(folder)
    vocab_size = write_byte_tokenizer(folder)
    head_dim = hidden // heads
    config = {
        "architectures": [arch], "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab_size, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": max_position, "tie_word_embeddings": tie_embeddings,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab_size, hidden, scale=0.5),
                                  "model.norm.weight": 1 + rnd(hidden)}
    if not tie_embeddings:
        w["lm_head.weight"] = rnd(vocab_size, hidden, scale=0.5)
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = rnd(intermediate, hidden)
        w[p + "mlp.up_proj.weight"] = rnd(intermediate, hidden)
        w[p + "mlp.down_proj.weight"] = rnd(hidden, intermediate)
        w[p + "input_layernorm.weight"] = 1 + rnd(hidden)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(hidden)
        if arch == "Qwen2ForCausalLM":
            w[p + "self_attn.q_proj.bias"] = rnd(heads * head_dim)
            w[p + "self_attn.k_proj.bias"] = rnd(kv_heads * head_dim)
            w[p + "self_attn.v_proj.bias"] = rnd(kv_heads * head_dim)
    save_file(w, str(folder / "model.safetensors"))
    return folder

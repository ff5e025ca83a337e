"""Tiny random checkpoints written by transformers itself: its config class, its model, save_pretrained.

The folder is what a real checkpoint looks like: config.json, sharded safetensors with their index,
tokenizer.json and tokenizer_config.json (the byte-level tokenizer of ``appliance.model.tiny``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from appliance.model.tiny import write_byte_tokenizer

SHARD = "60KB"  # small enough that every tiny model is split over several files and an index


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every weight so attention and the logits are far from uniform (transformers' own init,
    std 0.02, leaves near-ties that any rounding can flip). Norm weights stay near their neutral value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                neutral = 0.0 if getattr(model.config, "model_type", "").startswith("gemma") else 1.0
                p.copy_(neutral + 0.1 * noise)
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.5 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def save_tiny(folder: Path, model_cls: Any, config: Any, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Build ``model_cls(config)`` with random weights in fp32, save it sharded with a tokenizer; return
    the folder and the model (eval mode, eager attention: the reference)."""
    vocab = write_byte_tokenizer(folder)
    if config.vocab_size != vocab:
        raise ValueError(f"config.vocab_size must be {vocab} (the byte tokenizer's), got {config.vocab_size}")
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    randomize(model, seed)
    model.save_pretrained(folder, max_shard_size=SHARD)
    if not (folder / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"{folder}: expected a sharded checkpoint (an index json)")
    return folder, model

"""A loaded checkpoint: config, tokenizer pieces and HF-named weight tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from appliance.config import ModelConfig
from appliance.model.generation import GenerationDefaults
from appliance.model.q4_blocks import Q4Blocks
from appliance.model.q8_blocks import Q8Blocks


@dataclass
class Checkpoint:
    """Everything a loader hands the engine.

    ``weights`` use Hugging Face Llama names (``model.layers.{i}.self_attn.q_proj.weight`` …) in the
    rotate-half rotary layout, fp32 or the file's float dtype; the model casts them. ``quant`` holds
    the same names' quantized GGUF blocks where the file has them (4-bit: ``q4_blocks``; 8-bit:
    ``q8_blocks``), beside their floats.
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    quant: dict[str, Q4Blocks | Q8Blocks] = field(default_factory=dict)
    tokenizer_json: str | None = None
    vocab: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    special_tokens: list[str] = field(default_factory=list)
    pre_tokenizer: str = "default"
    chat_template: str | None = None
    name: str = "model"
    bos_token: str = ""  # the strings the chat template prints (tokenizer_config.json's)
    add_bos: bool = False  # GGUF: a plain prompt starts with ``bos_token`` (tokenizer.json says it itself)
    eos_token: str | None = None  # None: the first end-of-sequence id's token
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

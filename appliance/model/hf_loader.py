"""Load a Hugging Face model folder: config.json, *.safetensors, tokenizer.json, chat template."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from appliance.config import ModelConfig
from appliance.model.errors import ModelLoadError
from appliance.model.weights import Checkpoint

_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`ModelConfig`."""
    archs = raw.get("architectures") or []
    arch = next((_ARCHS[a] for a in archs if a in _ARCHS), None)
    if arch is None:
        raise ModelLoadError(
            f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"pdbox runs {', '.join(_ARCHS)}"
        )
    try:
        n_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelConfig(
            arch=arch,
            num_layers=int(raw["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_heads=n_heads,
            num_kv_heads=int(raw.get("num_key_value_heads", n_heads)),
            head_dim=int(raw.get("head_dim") or hidden // n_heads),
            vocab_size=int(raw["vocab_size"]),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_position=int(raw.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{source}: missing field {exc.args[0]!r}") from exc


def load_hf_folder(path: str | Path) -> Checkpoint:
    """Read a Hugging Face folder into a :class:`Checkpoint`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({exc})") from exc
    config = config_from_hf(raw, str(cfg_file))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: corrupt safetensors file ({exc})") from exc
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelLoadError(f"{path}: no tokenizer.json")
    template = None
    tc_file = path / "tokenizer_config.json"
    if tc_file.is_file():
        template = json.loads(tc_file.read_text()).get("chat_template")
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return Checkpoint(
        config=config,
        weights=weights,
        tokenizer_json=tok_file.read_text(),
        chat_template=template,
        name=path.name,
    )

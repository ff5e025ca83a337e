"""Load a Hugging Face model folder: config.json, *.safetensors, tokenizer.json, chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import ModelConfig
from appliance.model.errors import ModelLoadError
from appliance.model.families import FAMILIES, Family, family_of
from appliance.model.gemma import gemma_settings
from appliance.model.generation import GenerationDefaults, merge_ids, read_generation_config
from appliance.model.hf_rope import rope_from_hf
from appliance.model.weights import Checkpoint

if TYPE_CHECKING:
    import torch


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`ModelConfig`.

    A field the file omits takes its family's default in transformers (``appliance.model.families``).
    """
    found = family_of(raw)
    if found is None:
        archs = raw.get("architectures") or raw.get("model_type")
        raise ModelLoadError(f"{source}: unsupported architecture {archs!r}; pdbox runs {', '.join(FAMILIES)}")
    arch_name, fam = found
    if raw.get("mlp_bias"):
        raise ModelLoadError(f"{source}: mlp_bias=true ({arch_name}) is not supported")
    try:
        n_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        layers = int(raw["num_hidden_layers"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        raw = {"max_position_embeddings": fam.default_max_position, **raw}
        extra = _moe_fields(raw, layers) if fam.moe else {}
        if fam.gemma:
            gemma = gemma_settings(raw, layers, hidden, fam.default_theta, source, fam.arch)
            rope, extra = gemma.rope, gemma.fields
            window = raw.get("sliding_window", 4096) if "sliding_attention" in gemma.layer_types else None
        else:
            rope = rope_from_hf(raw, fam.default_theta, source)
            window = _sliding_window(raw, fam, layers)
        attention_bias = bool(raw.get("attention_bias", False))
        return ModelConfig(
            arch=fam.arch,
            num_layers=layers,
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_heads=n_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or fam.default_head_dim or hidden // n_heads),
            vocab_size=int(raw["vocab_size"]),
            rope_theta=rope.theta,
            rms_eps=float(raw.get("rms_norm_eps", fam.default_rms_eps)),
            # NOTE: attention is full; a sliding window bounds the context instead, so it is never exceeded.
            max_position=rope.max_position if window is None else min(rope.max_position, window),
            tie_embeddings=bool(raw.get("tie_word_embeddings", fam.gemma)),
            qkv_bias=fam.qkv_bias or attention_bias,
            o_bias=attention_bias,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rope_scaling=rope.scaling,
            qk_norm=fam.qk_norm,
            **extra,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{source}: missing field {exc.args[0]!r}") from exc


def _moe_fields(raw: dict, num_layers: int) -> dict:
    """Qwen3-MoE's expert settings (transformers' defaults where absent; it saves num_experts as
    num_local_experts). Layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 128)
    step = int(raw.get("decoder_sparse_step", 1))
    dense = set(raw.get("mlp_only_layers") or [])
    sparse = tuple(i for i in range(num_layers) if i not in dense and experts > 0 and step > 0 and (i + 1) % step == 0)
    return {"num_experts": experts, "experts_per_token": int(raw.get("num_experts_per_tok", 8)),
            "moe_intermediate_size": int(raw.get("moe_intermediate_size", 768)),
            "norm_topk_prob": bool(raw.get("norm_topk_prob", False)), "moe_layers": sparse}


def _sliding_window(raw: dict, fam: Family, num_layers: int) -> int | None:
    """The attention window some layers use, or None (transformers' rules: Mistral slides whenever
    ``sliding_window`` is set; Qwen only with ``use_sliding_window``, on its ``sliding_attention`` layers)."""
    window = raw.get("sliding_window", fam.sliding_window_default)
    if not window:
        return None
    if fam.sliding_window_switch:
        if not raw.get("use_sliding_window", False):
            return None
        first = int(raw.get("max_window_layers", 28))
        types = raw.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                           for i in range(num_layers)]
        if "sliding_attention" not in types:
            return None
    return int(window)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files: those the index (``model.safetensors.index.json``) names, else every one."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path}: no *.safetensors weight files")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{index}: not a safetensors index (no weight_map: {exc})") from exc
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
    return files


@dataclass(frozen=True)
class HFMetadata:
    """Everything in a folder but the weights: model config (its end-of-sequence ids merged with
    generation_config.json's), chat template and the special tokens it prints, generation defaults."""

    config: ModelConfig
    chat_template: str | None
    bos_token: str
    eos_token: str | None
    generation: GenerationDefaults


def read_hf_metadata(path: str | Path) -> HFMetadata:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model folder)")
    raw = _read_json(cfg_file)
    config = config_from_hf(raw, str(cfg_file))
    generation = read_generation_config(path)
    config = replace(config, eos_token_ids=merge_ids(config.eos_token_ids, generation.eos_token_ids))
    tc_file = path / "tokenizer_config.json"
    tc = _read_json(tc_file) if tc_file.is_file() else {}
    template = tc.get("chat_template")
    if isinstance(template, list):  # the older named-templates form: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return HFMetadata(config, template, _token_text(tc.get("bos_token")) or "", _token_text(tc.get("eos_token")),
                      generation)


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return raw


def _token_text(value: object) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_hf_folder(path: str | Path) -> Checkpoint:
    """Read a Hugging Face folder into a :class:`Checkpoint`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_hf_metadata(path)
    files = _weight_files(path)
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{f}: corrupt safetensors file ({exc})") from exc
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelLoadError(f"{path}: no tokenizer.json")
    return Checkpoint(
        config=meta.config,
        weights=weights,
        tokenizer_json=tok_file.read_text(),
        chat_template=meta.chat_template,
        name=path.name,
        bos_token=meta.bos_token,
        eos_token=meta.eos_token,
        generation=meta.generation,
    )

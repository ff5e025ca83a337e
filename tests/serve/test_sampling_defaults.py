"""A checkpoint's generation_config.json sampling defaults fill what a request leaves unset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.model.errors import ModelLoadError
from appliance.model.generation import GenerationDefaults, read_generation_config
from appliance.model.loader import load_generation_defaults
from appliance.serve import openai_api as oai

PROMPT = {"prompt": [5, 6, 7], "max_tokens": 2}


def parse(body: dict, defaults: GenerationDefaults = oai.NO_DEFAULTS) -> oai.Sampling:
    return oai.parse_completion(body, None, "m", max_model_len=64, vocab_size=32, defaults=defaults).sampling


def test_unset_fields_take_the_checkpoints_values_and_set_ones_win() -> None:
    ckpt = GenerationDefaults(temperature=0.6, top_p=0.9, top_k=20)
    s = parse(PROMPT, ckpt)
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.9, 20)
    s = parse({**PROMPT, "temperature": 0, "top_p": None, "top_k": 0}, ckpt)  # 0 is a value; None is unset
    assert (s.temperature, s.top_p, s.top_k) == (0.0, 0.9, -1)
    s = parse(PROMPT)  # a checkpoint that states nothing: pdbox's own defaults, as before
    assert (s.temperature, s.top_p, s.top_k) == (1.0, 1.0, -1)


def test_the_router_reads_them_from_the_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.8,
                                                                  "eos_token_id": [1, 2]}))
    d = load_generation_defaults(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.eos_token_ids) == (0.7, 0.8, None, (1, 2))
    assert parse(PROMPT, d).top_p == 0.8
    assert load_generation_defaults(None) == GenerationDefaults()  # the embedded GGUF states none


def test_a_checkpoints_repetition_penalty_applies_unless_the_request_sets_one(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.05}))
    d = read_generation_config(tmp_path)
    assert parse(PROMPT, d).repetition_penalty == 1.05  # Qwen2.5's, as vLLM applies it
    assert parse({**PROMPT, "repetition_penalty": 1}, d).repetition_penalty == 1.0
    assert parse(PROMPT).repetition_penalty == 1.0
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 0}))
    with pytest.raises(ModelLoadError, match="repetition_penalty must be in"):
        read_generation_config(tmp_path)

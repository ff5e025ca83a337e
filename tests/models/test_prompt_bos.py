"""A plain prompt (completions, ``LLM.generate``) starts with the BOS the checkpoint asks for, as transformers'
``tokenizer(text)`` and llama.cpp give it: Llama 3 and Gemma answer differently without it. A rendered chat
prompt prints its own BOS, so ``encode`` adds nothing."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from appliance.model.loader import load_checkpoint, load_tokenizer
from appliance.model.tiny import write_byte_tokenizer
from appliance.model.tokenizer import Tokenizer
from tests.models.gguf_tiny import convert
from tests.models.hf_tiny import save_tiny

TEXT = "The capital of France is"
BOS, BOS_TOKEN = 1, "<|im_start|>"  # appliance.model.tiny's second special token stands in for a BOS


def tiny_gguf(tmp_path, add_bos: bool | None):
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, vocab_size=259, num_hidden_layers=2, bos_token_id=BOS,
                         eos_token_id=2)
    folder, _ = save_tiny(tmp_path / "hf", LlamaForCausalLM, config)
    extra = {} if add_bos is None else {"add_bos": add_bos}
    return convert(folder, tmp_path / "tiny.gguf", "llama", config, extra)


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_gguf_prompt_starts_with_bos_when_the_file_says(tmp_path, add_bos) -> None:
    path = tiny_gguf(tmp_path, add_bos)
    engine_side = Tokenizer.from_checkpoint(load_checkpoint(str(path)))
    router_side = load_tokenizer(str(path))[0]
    plain = engine_side.encode(TEXT)
    assert plain[0] != BOS
    want = [BOS, *plain] if add_bos else plain
    assert engine_side.encode_prompt(TEXT) == router_side.encode_prompt(TEXT) == want
    assert router_side.encode(TEXT) == plain  # a chat prompt's own text: nothing added


def test_hf_folder_prompt_as_transformers_tokenizes_it(tmp_path) -> None:
    write_byte_tokenizer(tmp_path)
    tok_file = tmp_path / "tokenizer.json"
    spec = json.loads(tok_file.read_text())  # Llama 3's way: tokenizer.json's post-processor prints the BOS
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}, a], "pair": [a, b],
                              "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [BOS], "tokens": [BOS_TOKEN]}}}
    tok_file.write_text(json.dumps(spec))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                      "vocab_size": 259, "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "intermediate_size": 96,
                                                      "bos_token_id": BOS, "eos_token_id": 2}))
    ours = load_tokenizer(str(tmp_path))[0]
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    assert ours.encode_prompt(TEXT) == ref(TEXT).input_ids
    assert ours.encode_prompt(TEXT)[0] == BOS
    assert ours.encode(TEXT) == ref(TEXT, add_special_tokens=False).input_ids

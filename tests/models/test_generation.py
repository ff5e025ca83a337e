"""Generation settings from the checkpoint: several end-of-sequence ids, sampling defaults from
generation_config.json, and chat templates rendered as transformers renders them."""

from __future__ import annotations

import json

import pytest

from appliance.config import EngineConfig
from appliance.engine.engine import Engine
from appliance.engine.request import SamplingParams
from appliance.model.errors import ModelLoadError
from appliance.model.generation import GenerationDefaults
from appliance.model.loader import load_checkpoint, load_generation_defaults, load_tokenizer
from appliance.model.tiny import write_byte_tokenizer, write_tiny_model


def greedy(folder, ignore_eos: bool) -> tuple[list[int], str | None]:
    engine = Engine(str(folder), EngineConfig(dtype="float32", page_size=4, num_pages=32))
    try:
        req = engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=ignore_eos))
        engine.run_until_done([req])
        return list(req.output_ids), req.finish_reason
    finally:
        engine.shutdown()


def test_every_eos_id_of_config_and_generation_config_stops(tmp_path) -> None:
    folder = write_tiny_model(tmp_path / "tiny")
    tokens, _ = greedy(folder, ignore_eos=True)
    third = tokens[2]
    assert third not in tokens[:2] and third != 2, "pick another prompt: the third greedy token must be new"
    # Llama 3 style: config.json names one id, generation_config.json a list (<|eot_id|>, <|end_of_text|>)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, third]}))
    assert load_checkpoint(str(folder)).config.eos_token_ids == (2, third)
    assert load_tokenizer(str(folder))[0].eos_token_ids == (2, third)
    assert greedy(folder, ignore_eos=False) == (tokens[:3], "stop")


def test_sampling_defaults_fill_what_the_request_leaves_unset(tmp_path) -> None:
    folder = write_tiny_model(tmp_path / "tiny")
    assert load_generation_defaults(str(folder)) == GenerationDefaults()
    assert GenerationDefaults().sampling() == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0}
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "eos_token_id": 2}))
    d = load_generation_defaults(str(folder))
    assert d == GenerationDefaults(eos_token_ids=(2,), temperature=0.6, top_p=0.9, top_k=20)
    assert d.sampling() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.0}
    assert d.sampling(temperature=0.0, top_k=None) == {"temperature": 0.0, "top_p": 0.9, "top_k": 20,
                                                       "repetition_penalty": 1.0}
    assert GenerationDefaults(top_k=0).sampling()["top_k"] == -1  # transformers' "off"
    (folder / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ModelLoadError, match="temperature must be a number"):
        load_generation_defaults(str(folder))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ["</s>"]}))
    with pytest.raises(ModelLoadError, match="eos_token_id"):
        load_checkpoint(str(folder))


SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
# The features of Llama 3.1's template (and Qwen's): tools as JSON, strftime_now, raise_exception,
# bos_token, loop controls, add_generation_prompt; plus transformers' {% generation %} block.
TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%Y") %}{%- endif %}
{%- if messages[0]['role'] == 'assistant' %}
    {{- raise_exception('Conversation must start with a user or system turn') }}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: ' + date_string + '\\n' }}
{%- if tools is not none %}
    {{- 'You may call these functions (JSON):\\n' }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- for m in messages %}
    {%- if m['role'] == 'stop' %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if m['role'] == 'assistant' %}{% generation %}{{- m['content'] | trim }}{% endgeneration %}
    {%- else %}{{- m['content'] | trim }}{%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in <city> & today's",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
MESSAGES = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Température à Paris ?"},
            {"role": "assistant", "content": " Let me check. "}, {"role": "user", "content": "Thanks"},
            {"role": "stop", "content": "never shown"}]


def test_chat_template_renders_as_transformers(tmp_path) -> None:
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    write_byte_tokenizer(folder, TEMPLATE, SPECIALS)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    eot = {"__type": "AddedToken", "content": "<|eot_id|>", "special": True}
    tc.update(bos_token="<|begin_of_text|>", eos_token=eot, tokenizer_class="PreTrainedTokenizerFast")
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 261, "eos_token_id": [1, 2]}))
    ours, _, _ = load_tokenizer(str(folder))
    hf = AutoTokenizer.from_pretrained(str(folder))
    for tools in (None, TOOLS):
        for prompt in (True, False):
            want = hf.apply_chat_template(MESSAGES, tools=tools, add_generation_prompt=prompt, tokenize=False)
            assert ours.render_chat(MESSAGES, prompt, tools) == want
    ids = hf.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode_chat(MESSAGES, TOOLS) == list(ids)
    assert ours.encode_chat(MESSAGES)[0] == 0  # <|begin_of_text|> printed by the template
    assert ours.render_chat(MESSAGES, date_string="1 Jan 2030").count("1 Jan 2030") == 1
    with pytest.raises(ValueError, match="must start with a user or system turn"):
        ours.render_chat([{"role": "assistant", "content": "hi"}])

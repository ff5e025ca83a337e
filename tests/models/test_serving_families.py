"""Each family as a user runs it: `pdbox generate --model DIR` on every tiny family folder, and a tiny
Qwen3 (head_dim 128, GQA 2:1) served disaggregated, with prefill TP 2 slicing the KV heads, giving
unified mode's answers through the openai client."""

from __future__ import annotations

import openai
import pytest
from click.testing import CliRunner
from transformers import Qwen3Config, Qwen3ForCausalLM

from appliance.cli import main
from appliance.config import EngineConfig
from appliance.engine.request import SamplingParams
from appliance.llm import LLM
from tests.models.hf_tiny import save_tiny
from tests.models.test_families import COMMON, FAMILIES, VOCAB
from tests.serve.appliance_proc import assert_pools_idle, running_appliance

PROMPT = "The river stone"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pdbox_generate_runs_every_family_folder(tmp_path, family) -> None:
    model_cls, config = FAMILIES[family]()
    folder, _ = save_tiny(tmp_path / family, model_cls, config)
    result = CliRunner().invoke(main, ["generate", PROMPT, "--model", str(folder), "--max-tokens", "6", "--raw",
                                       "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    llm = LLM(str(folder), EngineConfig(dtype="float32"))
    try:
        want = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0))[0].text
    finally:
        llm.close()
    assert want and want in result.output, (want, result.output)


@pytest.mark.slow
def test_tiny_qwen3_disaggregated_answers_equal_unified(tmp_path) -> None:
    config = Qwen3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=128, max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **COMMON)
    folder, _ = save_tiny(tmp_path / "qwen3", Qwen3ForCausalLM, config)
    assert config.vocab_size == VOCAB
    prompts = ["The river stone", "Copper lamp in winter", "1 2 3 4"]

    def answers(url: str) -> list[str]:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        return [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0).choices[0].text
                for p in prompts]

    common = ("--model", str(folder), "--dtype", "float32", "--kv-cache-mb", "16", "--no-monitor")
    with running_appliance("--mode", "unified", "--cpus", "0", *common) as url:
        want = answers(url)
    with running_appliance("--mode", "disagg", "--prefill-tp", "2", "--prefill-cpus", "0-1", "--decode-cpus", "1",
                           *common) as url:
        got = answers(url)
        assert_pools_idle(url)
    assert all(want) and got == want

"""Bad model folders and files fail at load with an error naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Qwen3Config, Qwen3ForCausalLM

from appliance.config import RopeScaling
from appliance.model.errors import ModelLoadError
from appliance.model.gguf_config import rope_scaling_of
from appliance.model.loader import load_checkpoint, load_tokenizer
from tests.models.hf_tiny import save_tiny


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> Path:
    config = Qwen3Config(vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    folder, _ = save_tiny(tmp_path_factory.mktemp("bad") / "qwen3", Qwen3ForCausalLM, config)
    return folder


def edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def test_missing_shard_is_named(qwen3_folder, tmp_path) -> None:
    import shutil

    folder = Path(shutil.copytree(qwen3_folder, tmp_path / "q"))
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"missing: {shard.name}"):
        load_checkpoint(str(folder))


@pytest.mark.parametrize("changes,needle", [
    ({"architectures": ["Phi3ForCausalLM"]}, r"unsupported architecture \['Phi3ForCausalLM'\].*Gemma2ForCausalLM"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "unsupported rope type 'longrope'"),
    ({"rope_scaling": {"type": "yarn", "factor": -2.0}}, "factor must be a number > 0"),
])
def test_unsupported_settings_fail_at_load(qwen3_folder, tmp_path, changes, needle) -> None:
    import shutil

    folder = Path(shutil.copytree(qwen3_folder, tmp_path / "q"))
    edit_config(folder, **changes)
    with pytest.raises(ModelLoadError, match=needle):
        load_checkpoint(str(folder))
    with pytest.raises(ModelLoadError, match=needle):  # the router's tokenizer-only load says the same
        load_tokenizer(str(folder))


def test_gguf_rope_scaling_keys() -> None:
    def keys(**kv):
        return lambda name, default=None: kv.get(name.replace(".", "_"), default)

    path = Path("m.gguf")
    assert rope_scaling_of(keys(), None, 4096, path) == (RopeScaling(), 4096)
    assert rope_scaling_of(keys(rope_scaling_type="linear", rope_scaling_factor=4.0), None, 4096, path) == (
        RopeScaling("linear", factor=4.0), 4096)
    yarn = keys(rope_scaling_type="yarn", rope_scaling_factor=4.0, rope_scaling_original_context_length=32768)
    assert rope_scaling_of(yarn, None, 32768, path) == (RopeScaling("yarn", factor=4.0, original_max_position=32768),
                                                    131072)
    with pytest.raises(ModelLoadError, match="unsupported rope scaling type 'longrope'"):
        rope_scaling_of(keys(rope_scaling_type="longrope"), None, 4096, path)
    factors = (1.0, 2.0)  # rope_freqs (Llama 3.1 in GGUF): divisors on a default or linear rope, not yarn
    assert rope_scaling_of(keys(), factors, 4096, path) == (RopeScaling(freq_factors=factors), 4096)
    with pytest.raises(ModelLoadError, match="rope_freqs factors with yarn"):
        rope_scaling_of(yarn, factors, 4096, path)
    with pytest.raises(ModelLoadError, match="must be numbers > 0"):
        rope_scaling_of(keys(), (1.0, 0.0), 4096, path)


def test_unsupported_gguf_architecture_is_named(tmp_path) -> None:
    import gguf

    path = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'phi3' in GGUF; pdbox reads .*qwen3moe"):
        load_checkpoint(str(path))

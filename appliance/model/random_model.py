"""Random-weight Llama checkpoints named by a spec (``random:llama-8b``), built on the device.

For benchmarks and device checks: no files are read or written. The weights are drawn, seeded, directly
on the target device in the target dtype (N(0, 0.02), norms 1), so an 8B shape costs no host memory and
no copy. The tokenizer is a byte-level stand-in (the 256 byte symbols plus 3 specials): any text
encodes, and ids beyond it decode to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from appliance.config import ModelConfig
from appliance.model.weights import Checkpoint

PREFIX = "random:"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class RandomSpec:
    """The shape of a random-weight Llama."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    max_position: int = 32768
    rope_theta: float = 500000.0
    std: float = 0.02
    seed: int = 0

    @property
    def num_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.layers * (attn + mlp + 2 * self.hidden) + self.vocab * self.hidden + head + self.hidden


SPECS: dict[str, RandomSpec] = {
    # Llama-3.2-1B's shapes
    "llama-1b": RandomSpec(16, 2048, 32, 8, 64, 8192, 128256, tie_embeddings=True),
    # Llama-3-8B's shapes
    "llama-8b": RandomSpec(32, 4096, 32, 8, 128, 14336, 128256, tie_embeddings=False),
    # GPU tests: every kernel dim >= 16, GQA 4, compiles and runs in moments
    "small": RandomSpec(2, 256, 4, 1, 64, 512, 1024, tie_embeddings=False, max_position=4096, std=0.05),
    # CPU tests: tiny
    "tiny": RandomSpec(2, 64, 4, 2, 16, 128, 512, tie_embeddings=False, max_position=1024, std=0.05),
}


def is_random_spec(model: object) -> bool:
    return isinstance(model, str) and model.startswith(PREFIX)


def parse_spec(model: str) -> RandomSpec:
    """``random:NAME`` -> its :class:`RandomSpec`; an unknown name is a ``ValueError`` listing the known ones."""
    if not is_random_spec(model):
        raise ValueError(f"{model!r} is not a random model spec (expected {PREFIX}NAME)")
    name = model[len(PREFIX):]
    if name not in SPECS:
        raise ValueError(f"unknown random model {model!r}: choose one of "
                         f"{', '.join(PREFIX + n for n in SPECS)}")
    return SPECS[name]


def model_config(spec: RandomSpec) -> ModelConfig:
    return ModelConfig(
        arch="llama", num_layers=spec.layers, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_heads=spec.heads, num_kv_heads=spec.kv_heads, head_dim=spec.head_dim, vocab_size=spec.vocab,
        rope_theta=spec.rope_theta, max_position=spec.max_position, tie_embeddings=spec.tie_embeddings,
        eos_token_ids=(),
    )


def byte_tokenizer_json() -> str:
    """A byte-level BPE with no merges over the 256 byte symbols (after 3 specials), as JSON."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok.to_str()


def random_weights(spec: RandomSpec, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named weights drawn on ``device`` in ``dtype`` from one seeded generator (same seed, same weights)."""
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    d, hd = spec.hidden, spec.head_dim

    def rnd(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, device=device, dtype=dtype)
        return t.normal_(0.0, spec.std, generator=gen)

    def ones() -> torch.Tensor:
        return torch.ones(d, device=device, dtype=dtype)

    w = {"model.embed_tokens.weight": rnd(spec.vocab, d), "model.norm.weight": ones()}
    if not spec.tie_embeddings:
        w["lm_head.weight"] = rnd(spec.vocab, d)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(spec.heads * hd, d)
        w[p + "self_attn.k_proj.weight"] = rnd(spec.kv_heads * hd, d)
        w[p + "self_attn.v_proj.weight"] = rnd(spec.kv_heads * hd, d)
        w[p + "self_attn.o_proj.weight"] = rnd(d, spec.heads * hd)
        w[p + "mlp.gate_proj.weight"] = rnd(spec.intermediate, d)
        w[p + "mlp.up_proj.weight"] = rnd(spec.intermediate, d)
        w[p + "mlp.down_proj.weight"] = rnd(d, spec.intermediate)
        w[p + "input_layernorm.weight"] = ones()
        w[p + "post_attention_layernorm.weight"] = ones()
    return w


def random_checkpoint(model: str, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> Checkpoint:
    """The :class:`Checkpoint` of ``random:NAME``, its weights already on ``device`` in ``dtype``."""
    spec = parse_spec(model)
    weights = random_weights(spec, torch.device(device), dtype)
    return Checkpoint(config=model_config(spec), weights=weights, tokenizer_json=byte_tokenizer_json(),
                      special_tokens=list(SPECIALS), name=model)

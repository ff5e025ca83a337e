"""Prompts of random token ids decoded to text, as `vllm bench serve --dataset-name random` builds them.

Each prompt draws its ids uniformly from the tokenizer's vocabulary, decodes them (special tokens decode
to nothing, as vLLM's random dataset leaves them out), and cuts the text so that it encodes back to
exactly the asked length where the tokenizer allows it (`fit_to_length`: decoded random ids rarely
re-encode to the same count; a real BPE ends within a token or two). The same (seed, shape) always
gives the same prompts, so two servers see the same text; different seeds share no prefix, so a prefix
cache cannot hit across runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench.workloads import BenchRequest, TextCodec, fit_to_length

_RANDOM_STREAM = 5  # NOTE: distinct from the workload and arrival streams under the same seed


def token_pool(codec: TextCodec) -> np.ndarray:
    """The ids prompts are drawn from: the whole vocabulary."""
    if codec.vocab_size is None:
        raise ValueError(f"tokenizer {codec.name} does not say its vocabulary size; random prompts need it")
    return np.arange(codec.vocab_size)


class RandomTokenPrompts:
    """Builds requests whose prompts are random token ids of `codec`'s tokenizer, decoded to text."""

    def __init__(self, codec: TextCodec, pool: Sequence[int] | np.ndarray | None = None) -> None:
        self.codec = codec
        self.pool = np.asarray(pool) if pool is not None else token_pool(codec)
        if self.pool.size < 2:
            raise ValueError("random prompts need a token pool of at least two ids")

    def build(self, count: int, prompt_len: int, output_len: int, seed: int, kind: str) -> list[BenchRequest]:
        """`count` requests of `prompt_len` prompt tokens (as this tokenizer counts) and `output_len` answers."""
        if count < 1 or prompt_len < 1 or output_len < 1:
            raise ValueError(f"need count, prompt_len and output_len >= 1, got {count}, {prompt_len}, {output_len}")
        rng = np.random.default_rng([seed, _RANDOM_STREAM])
        requests = []
        for _ in range(count):
            ids = rng.choice(self.pool, size=prompt_len * 5 // 4 + 16).tolist()
            text, length = fit_to_length(
                lambda n, src=ids: self.codec.decode(src[:n]), prompt_len, self.codec.encode, prompt_len
            )
            requests.append(BenchRequest(text, length, output_len, kind))
        return requests

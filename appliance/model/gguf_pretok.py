"""How a GGUF byte-level BPE vocabulary splits text before merging: ``tokenizer.ggml.pre`` -> a pre-tokenizer.

The split decides which merges can apply, so a wrong one changes the ids (Llama 3 cuts digit runs into
groups of up to three, Qwen2 into single digits; both let one non-letter lead a word, GPT-2 does not).
The patterns are those of the models' own ``tokenizer.json`` files (llama.cpp's ``llama-vocab.cpp`` names
the same ones). Any other name keeps GPT-2's split, the ``default`` llama.cpp falls back to as well.
"""

from __future__ import annotations

from typing import Any

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3,
          "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "deepseek-coder")  # single digits, then GPT-2's split


def gguf_pre_tokenizer(pre: str) -> Any:
    """The ``tokenizers`` pre-tokenizer for a GGUF file's ``tokenizer.ggml.pre`` name."""
    from tokenizers import Regex, pre_tokenizers

    if pre in SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level

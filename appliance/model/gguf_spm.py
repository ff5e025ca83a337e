"""A SentencePiece GGUF vocabulary (``tokenizer.ggml.model == "llama"``: Llama 2, Mistral v0.1, Gemma) as a
Hugging Face ``tokenizers`` BPE with byte fallback, built as transformers' GGUF conversion builds it
(``convert_gguf_tokenizer``), so ids and text agree with it:

- Merges: the file's ``tokenizer.ggml.merges`` if it has them, else every split of a token into two tokens,
  best first: by the token's ``tokenizer.ggml.scores`` (SentencePiece's merge priority), or by its place in
  the file on Gemma, whose scores do not follow its merge order. Ties: the longer left piece first, then the
  longer right piece, then the file's order.
- Gemma files spell a token of several spaces with real spaces; it is looked up as "▁▁…".
- A space is "▁". ``tokenizer.ggml.add_space_prefix`` (absent: true, but false on Gemma, as llama.cpp's
  converter writes them) puts one before the text, and decoding drops it again.
- Control and unknown tokens, and the bos/eos/unk/pad ids' tokens, are special: matched whole in the text,
  skipped by ``decode``. User-defined tokens are matched whole and kept. Byte tokens ``<0xNN>`` spell what
  the vocabulary lacks.
- A plain prompt starts with BOS unless ``tokenizer.ggml.add_bos_token`` is false (absent: true, as in
  llama.cpp and transformers).

transformers picks the space prefix by architecture alone (all but Gemma); pdbox reads the file's flag, as
llama.cpp does. The two agree on the files llama.cpp's converter writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.model.errors import ModelLoadError
from appliance.model.gguf_config import Key

TOKENIZER_MODELS = ("gpt2", "llama")  # tokenizer.ggml.model values pdbox reads: byte-level BPE, SentencePiece
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # tokenizer.ggml.token_type values (gguf.TokenType)
SPACE = "\u2581"


def check_tokenizer_model(kind: Any, path: str | Path) -> None:
    """Refuse a ``tokenizer.ggml.model`` pdbox cannot read, by name."""
    if kind not in TOKENIZER_MODELS:
        raise ModelLoadError(f"{path}: tokenizer model {kind!r} is not supported; pdbox reads "
                             "'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies from GGUF")


def adds_bos(get: Key) -> bool:
    """Whether a plain prompt starts with BOS: ``tokenizer.ggml.add_bos_token``, true when absent."""
    return bool(get("tokenizer.ggml.add_bos_token", True)) and get("tokenizer.ggml.bos_token_id") is not None


def spm_tokenizer(get: Key, arch: str) -> Any:
    """The ``tokenizers.Tokenizer`` of a SentencePiece GGUF vocabulary; ``get(key, default)`` reads metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    original = [str(t) for t in get("tokenizer.ggml.tokens", [])]
    if not original:
        raise ModelLoadError("the GGUF file has no tokenizer.ggml.tokens")
    types = [int(k) for k in _array(get, "tokenizer.ggml.token_type", len(original), [1] * len(original))]
    gemma = arch in GEMMA_ARCHS
    tokens = [SPACE * len(t) if gemma and " " in t and not t.strip() else t for t in original]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges", [])]
    if not merges:
        if gemma:
            priority: Sequence[float] = [-i for i in range(len(tokens))]
        else:
            priority = _array(get, "tokenizer.ggml.scores", len(tokens), None)
            if priority is None:
                raise ModelLoadError("the SentencePiece vocabulary has no tokenizer.ggml.scores (nor merges): "
                                     "its merge order is unknown")
        merges = derive_merges(tokens, priority)
    unk_id = get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    strip = []
    if get("tokenizer.ggml.add_space_prefix", not gemma):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        strip = [decoders.Strip(content=" ", left=1)]
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *strip])
    named = {int(v) for k in ("bos", "eos", "unknown", "padding")
             if (v := get(f"tokenizer.ggml.{k}_token_id")) is not None}
    special = [t for i, (t, k) in enumerate(zip(original, types)) if k in (UNKNOWN, CONTROL) or i in named]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special if t in vocab])
    user = [t for t, k in zip(original, types) if k == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    bos_id = get("tokenizer.ggml.bos_token_id")
    if adds_bos(get) and int(bos_id) < len(tokens):
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, int(bos_id))])
    return tok


def derive_merges(tokens: Sequence[str], priority: Sequence[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, the token of highest ``priority`` first (ties: longer left
    piece, longer right piece, then the file's order). A repeated token counts once, in its first place,
    with its last priority."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for order, (token, score) in enumerate(dict(zip(tokens, priority)).items()):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                found.append((-float(score), -cut, cut - len(token), order, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _array(get: Key, key: str, size: int, default: Any) -> Any:
    values = get(key)
    if values is None:
        return default
    values = list(values)
    if len(values) != size:
        raise ModelLoadError(f"the GGUF file's {key} has {len(values)} entries for {size} tokens")
    return values

"""A hand-made SentencePiece vocabulary, laid out as llama.cpp's converter writes one to GGUF: control tokens
first, the 256 byte tokens ``<0x00>``..``<0xFF>``, then pieces with "▁" for a space, their scores out of the
file's order (with ties) so that score order and file order give different merges."""

from __future__ import annotations

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

PIECES = ["▁", "e", "t", "h", "a", "o", "n", "r", "i", "s", "l", "c", "p", "f", "F", "T", "1", "2", "3", "\n",
          "▁t", "he", "▁the", "▁a", "in", "er", "an", "▁c", "ap", "▁cap", "it", "al", "ital", "▁capital", "of",
          "▁of", "▁F", "ce", "nce", "ance", "rance", "▁France", "▁is", "is", "12", "123", "▁1", "▁▁", "▁▁▁▁",
          "\n\n", "Th", "The", "▁The"]  # each word's merges reach it whatever the scores
# merges that compete, so the order decides the pieces: "bdy" (score: "dy" first; file order: "bd"), "uvwx"
# (equal scores: the longer left piece, "uv"+"w", first), "gkm" (equal scores and lengths: the file's order)
CONTESTED = [("b", -1.0), ("d", -1.0), ("y", -1.0), ("u", -1.0), ("v", -1.0), ("w", -1.0), ("x", -1.0), ("g", -1.0),
             ("k", -1.0), ("m", -1.0), ("bd", -5.0), ("dy", -2.0), ("uv", -1.0), ("wx", -4.0), ("uvw", -4.0),
             ("gk", -6.0), ("km", -6.0)]
LLAMA_SPECIAL = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]  # unk 0, bos 1, eos 2
GEMMA_SPECIAL = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                 ("<mask>", CONTROL)]  # pad 0, eos 1, bos 2, unk 3
TURNS = [("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]


def spm_vocab(gemma: bool = False) -> dict:
    """``tokens``, ``scores``, ``types`` and the ids (``unk``, ``bos``, ``eos``, ``pad``) of a Llama 2-like
    vocabulary, or a Gemma-like one (its own special names; a user-defined ``<think>``; a two-space token
    spelled with real spaces, as Gemma files have it)."""
    head = (GEMMA_SPECIAL if gemma else LLAMA_SPECIAL) + TURNS
    pieces = [(p, NORMAL) for p in PIECES] + [("<think>", USER_DEFINED)]
    if gemma:
        pieces = [(p, NORMAL) for p in PIECES if p != "▁▁"] + [("  ", NORMAL), ("<think>", USER_DEFINED)]
    body = [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    entries = head + body + pieces + [(p, NORMAL) for p, _ in CONTESTED]
    scores = ([0.0] * (len(head) + len(body)) + [-float((i * 7) % 11) for i in range(len(pieces))]
              + [score for _, score in CONTESTED])
    ids = {"unk": 3, "bos": 2, "eos": 1, "pad": 0} if gemma else {"unk": 0, "bos": 1, "eos": 2, "pad": None}
    return {"tokens": [t for t, _ in entries], "types": [k for _, k in entries], "scores": scores, **ids}


def gguf_metadata(vocab: dict, **flags) -> dict:
    """The ``tokenizer.ggml.*`` keys of ``vocab`` (``flags``: more keys, like ``add_space_prefix``)."""
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": vocab["tokens"],
            "tokenizer.ggml.scores": vocab["scores"], "tokenizer.ggml.token_type": vocab["types"],
            "tokenizer.ggml.unknown_token_id": vocab["unk"], "tokenizer.ggml.bos_token_id": vocab["bos"],
            "tokenizer.ggml.eos_token_id": vocab["eos"]}
    return {**meta, **{f"tokenizer.ggml.{k}": v for k, v in flags.items()}}

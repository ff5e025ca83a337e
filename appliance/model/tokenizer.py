"""Tokenizer (Hugging Face ``tokenizers``) and chat template (jinja2) for a loaded model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.model.chat_template import ChatTemplate
from appliance.model.errors import ModelLoadError
from appliance.model.weights import Checkpoint

_FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(self, backend: Any, chat_template: str | None, eos_token_ids: Sequence[int] = (),
                 bos_token: str = "", eos_token: str | None = None):
        """``bos_token`` / ``eos_token``: the strings the chat template may print (tokenizer_config.json's);
        ``eos_token=None`` takes the first end-of-sequence id's token."""
        self._tok = backend
        self.chat_template = chat_template or _FALLBACK_TEMPLATE
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template: ChatTemplate | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        if ckpt.tokenizer_json is not None:
            backend = HFTokenizer.from_str(ckpt.tokenizer_json)
        else:
            backend = _bpe_from_pieces(ckpt.vocab, ckpt.merges, ckpt.special_tokens, ckpt.pre_tokenizer,
                                       ckpt.bos_token if ckpt.add_bos else "")
        return cls(backend, ckpt.chat_template, ckpt.config.eos_token_ids, ckpt.bos_token, ckpt.eos_token)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build only the tokenizer of a GGUF file (no weights are dequantized)."""
        from appliance.model.gguf_file import open_gguf

        get = open_gguf(path).fields.get

        from appliance.model.gguf_config import end_ids
        from appliance.model.gguf_spm import check_tokenizer_model, spm_tokenizer

        kind = get("tokenizer.ggml.model")
        check_tokenizer_model(kind, path)
        vocab = list(get("tokenizer.ggml.tokens", []))
        types = list(get("tokenizer.ggml.token_type", []))
        bos = get("tokenizer.ggml.bos_token_id")
        bos_token = vocab[int(bos)] if bos is not None and int(bos) < len(vocab) else ""
        if kind == "llama":  # SentencePiece
            backend = spm_tokenizer(get, str(get("general.architecture", "")))
            return cls(backend, get("tokenizer.chat_template"), end_ids(get), bos_token)
        backend = _bpe_from_pieces(
            vocab,
            list(get("tokenizer.ggml.merges", [])),
            [t for t, k in zip(vocab, types) if k in (3, 4)],
            str(get("tokenizer.ggml.pre", "default")),
            bos_token if get("tokenizer.ggml.add_bos_token", False) else "",
        )
        return cls(backend, get("tokenizer.chat_template"), end_ids(get), bos_token)

    # -- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` as it stands (a rendered chat prompt prints its own BOS)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a plain prompt, as transformers' ``tokenizer(text)`` and llama.cpp give them: with the
        BOS the checkpoint asks for (Llama 3's ``<|begin_of_text|>``, Gemma's ``<bos>``; tokenizer.json's
        post-processor, or GGUF's ``tokenizer.ggml.add_bos_token``)."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None, **extra: Any) -> str:
        """Render ``messages`` (and ``tools``, and any extra template variables) with the model's chat
        template, as transformers' ``apply_chat_template`` does."""
        if self._template is None:
            eos = self.eos_token
            if eos is None:
                eos = (self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else "") or ""
            self._template = ChatTemplate(self.chat_template, self.bos_token, eos)
        return self._template.render(messages, add_generation_prompt, tools, **extra)

    def encode_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                    **extra: Any) -> list[int]:
        return self.encode(self.render_chat(messages, True, tools, **extra))


def _bpe_from_pieces(vocab: list[str], merges: list[str], special: list[str], pre: str, add_bos: str = "") -> Any:
    """A byte-level BPE tokenizer from GGUF's ``tokenizer.ggml.*`` pieces; ``add_bos``: the BOS token a plain
    prompt starts with (GGUF's ``tokenizer.ggml.add_bos_token``), '' for none."""
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as HFTokenizer

    from appliance.model.gguf_pretok import gguf_pre_tokenizer

    if not vocab:
        raise ModelLoadError("the model has no tokenizer vocabulary")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=pairs, fuse_unk=False)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = gguf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if add_bos:
        bos_id = tok.token_to_id(add_bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{add_bos} $A", pair=f"{add_bos} $A $B",
                                                           special_tokens=[(add_bos, bos_id)])
    return tok

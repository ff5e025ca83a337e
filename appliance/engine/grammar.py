"""Per-request grammar matchers (llguidance) over one engine's tokenizer.

The llguidance tokenizer is built from pdbox's own (``tokenizers``) backend on the first constrained
request (~0.5 s for a 49k vocabulary), never for an engine that serves none. Each distinct
constraint is compiled once into a pristine matcher, kept in a small LRU; a request gets a cheap
deep copy of it (microseconds). A matcher follows the request's output: it consumes every sampled
token, and a request that arrives with tokens already generated (decode after prefill, a moved
decode) replays them first.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance

from appliance.engine.constraint import Constraint
from appliance.engine.token_mask import MaskBuilder, TokenMask

CACHE_SIZE = 64


class GrammarCompiler:
    """Builds matchers for ``constraint``s; ``vocab_size`` is the model's (logits' width)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(set(int(t) for t in eos_ids))
        self._ll: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()
        self._masks: MaskBuilder | None = None

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll is None:
            if not self.eos_ids:
                raise ValueError("structured outputs need an end-of-sequence token; this model states none")
            backend = self.tokenizer._tok  # the `tokenizers.Tokenizer` of appliance.model.tokenizer.Tokenizer
            n_vocab = max(self.vocab_size, int(backend.get_vocab_size()))
            self._ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=self.eos_ids)
        return self._ll

    def mask(self, matchers: Sequence[llguidance.LLMatcher | None]) -> TokenMask | None:
        """The allowed tokens of a step's rows (``None`` entries: unconstrained rows); None if all are."""
        if all(m is None for m in matchers):
            return None
        if self._masks is None:
            self._masks = MaskBuilder((self.ll_tokenizer.vocab_size + 31) // 32)
        return self._masks.build(matchers)

    def matcher(self, constraint: Constraint, replay: Sequence[int] = ()) -> llguidance.LLMatcher:
        """A fresh matcher for ``constraint`` that has consumed ``replay``; ValueError if either fails."""
        pristine = self._compiled.get(constraint)
        if pristine is None:
            pristine = llguidance.LLMatcher(self.ll_tokenizer, constraint.grammar(), log_level=0)
            if pristine.is_error():
                raise ValueError(f"the {constraint.kind} constraint does not compile: {pristine.get_error()}")
            self._compiled[constraint] = pristine
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(constraint)
        m = pristine.deep_copy()
        if replay and not m.consume_tokens(list(replay)):
            raise ValueError(f"the tokens so far do not match the {constraint.kind} constraint: {m.get_error()}")
        return m


def consume(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed one sampled token; True when the constrained answer is complete (only EOS may follow).

    A token the mask forbade (it cannot happen unless the grammar and the sampler disagree) leaves
    the matcher in error: the answer ends there too, with a note on stderr."""
    if not matcher.consume_token(token):
        print(f"pdbox engine: constrained token {token} rejected: {matcher.get_error()}", file=sys.stderr, flush=True)
        return True
    return matcher.is_stopped()

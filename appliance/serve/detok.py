"""Incremental detokenization for streaming, with exact stop-string cuts.

Text is released only when it is stable: never a trailing U+FFFD (half of a multi-byte character)
and never a tail that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalText:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def feed(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly stable text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        self.text = self.tok.decode(self.ids)
        for s in self.stop:
            i = self.text.find(s)
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True
        stable = len(self.text)
        if not self.stopped:
            if self.text.endswith("\ufffd"):
                stable = len(self.text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        stable = min(stable, len(self.text) - k)
                        break
        delta = self.text[self.emitted : stable] if stable > self.emitted else ""
        self.emitted = max(self.emitted, stable)
        return delta

    def finish(self) -> str:
        """The rest of the text once the request is over."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

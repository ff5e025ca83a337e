"""Incremental detokenization for streaming, with exact stop-string cuts.

Text is released only when it is stable: never a trailing U+FFFD (half of a multi-byte character)
and never a tail that could still grow into a stop string.

Cost per token is constant, not the answer's length: each step decodes only the ids since the last
stable point plus the few before it (``prefix``), which give the tokenizer its context (a
SentencePiece word's leading space, a byte-level character split across tokens); the new text is
the window's text minus the prefix's text. Stop strings are searched in the new tail only, and with
``min_tokens`` only once that many tokens are in, from the end of the first ``min_tokens - 1`` tokens' text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalText:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), min_tokens: int = 0) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens
        self.stop_from: int | None = None if min_tokens > 1 else 0  # where a stop string may start
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] give context; their text is already in self.text
        self.read = 0  # ids[:read] are in self.text
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def feed(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly stable text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(token_ids)
        self._append(self._pending(), final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once the request is over (an unfinished character shows as U+FFFD)."""
        if not self.stopped and self.read < len(self.ids):
            self._append(self._pending(), final=True)
        return self._release(final=True)

    def _pending(self) -> str:
        """Text of ids[read:], decoded with ids[prefix:read] as context."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        window = self.tok.decode(self.ids[self.prefix :])
        if window.startswith(before):
            return window[len(before) :]
        return self.tok.decode(self.ids)[len(self.text) :]  # context changed the prefix's text: rare, exact

    def _append(self, new: str, final: bool) -> None:
        if not new or (new.endswith("\ufffd") and not final):
            return  # half a character: wait for the token that completes it
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new
        self.prefix, self.read = self.read, len(self.ids)
        if len(self.ids) < self.min_tokens:
            return  # too short to stop yet
        if self.stop_from is None:
            self.stop_from = len(self.tok.decode(self.ids[:self.min_tokens - 1]))
        start = max(start, self.stop_from)
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True
                start = min(start, i)

    def _release(self, final: bool) -> str:
        stable = len(self.text)
        if not (final or self.stopped):
            for s in self.stop:  # hold back a tail that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        stable = min(stable, len(self.text) - k)
                        break
        delta = self.text[self.emitted : stable] if stable > self.emitted else ""
        self.emitted = max(self.emitted, stable)
        return delta

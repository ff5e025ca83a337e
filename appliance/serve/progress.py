"""One request in flight, as the adaptive placement sees it (its table of them steers placement and moves)."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.serve import openai_api as oai


@dataclass
class Progress:
    """Where a request prefills and decodes, and how far it is."""

    prefill_on: str
    decode_on: str
    tokens: int  # uncached prompt tokens sent to prefill
    max_tokens: int
    sent_at: float  # when the prompt went to its prefill engine (after a drain hold, if any)
    first_at: float | None = None
    emitted: int = 0
    held: bool = False  # waiting in the router for ``prefill_on`` to drain: its prefill counts as queued there
    parsed: oai.ParsedRequest | None = None  # what a move needs to re-open the request elsewhere
    moving: bool = False

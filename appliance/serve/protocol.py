"""Typed messages between the router and the workers. ONE serializer: msgspec JSON. No pickle."""

from __future__ import annotations

import msgspec

MAX_LEASE_S = 3600.0  # a decode reservation never outlives this, whatever the request says


class ConstraintSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Wire form of :class:`appliance.engine.constraint.Constraint` (structured outputs)."""

    kind: str
    spec: str = ""


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """Wire form of :class:`appliance.engine.request.SamplingParams`."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    constraint: ConstraintSpec | None = None
    n: int = 1  # samples sharing the prompt's KV (sample i: seed + i); each streams with its index
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: list[tuple[int, float]] = []
    prompt_logprobs: int | None = None  # score the prompt too (echo with logprobs), this many alternatives
    min_tokens: int = 0

    def to_params(self):  # -> SamplingParams (lazy import: the router must not import torch)
        from appliance.engine.constraint import Constraint
        from appliance.engine.request import SamplingParams

        c = self.constraint
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, seed=self.seed, stop=tuple(self.stop), stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos, logprobs=self.logprobs,
            constraint=None if c is None else Constraint(c.kind, c.spec), n=self.n,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=tuple(self.logit_bias),
            prompt_logprobs=self.prompt_logprobs, min_tokens=self.min_tokens,
        )


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Router -> unified worker: run the whole request here."""

    rid: str
    prompt_ids: list[int]
    sampling: Sampling


class DecodeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Router -> decode worker: reserve pages for ``room``, then continue after prefill's handoff."""

    rid: str
    room: str
    prompt_ids: list[int]
    sampling: Sampling
    prefill_tp: int = 1
    lease_s: float = 5.0
    reserve_tokens: int = 0  # pages for this many tokens (0: the prompt); a moved request's context is longer


class PrefillRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Router -> prefill worker: compute the prompt, push KV into ``dst_pages`` of the decode pool(s)."""

    rid: str
    room: str
    prompt_ids: list[int]
    sampling: Sampling
    dst_pages: list[int]
    handles: list[str]  # PoolHandle JSON, one per decode TP rank


class PrefillAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """Prefill worker -> router, once the KV is pushed: the first token (and its logprobs) and usage."""

    token_ids: list[int]
    logprobs: list[dict] = []
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[dict] | None = None  # when the sampling asks: entry j scores prompt token j + 1


class ExtendRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Router -> decode worker: ``room``'s prefill is still coming (its prompt waits in prefill's queue);
    hold the reservation ``lease_s`` more seconds from now."""

    room: str
    lease_s: float


class MoveRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Router -> the engine decoding ``rid``: push its KV into ``dst_pages`` of another decode pool
    (reserved for ``room``), then drop it here; the other engine goes on decoding it."""

    rid: str
    room: str
    dst_pages: list[int]
    handles: list[str]


class _Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="kind"):
    """One line of a worker's NDJSON stream; its class is its ``kind`` on the wire."""


class Reserved(_Event, tag="reserved"):
    """Decode: the pages reserved for the request, and the pool handle(s) to push its KV into."""

    pages: list[int] = []
    handles: list[str] = []


class Tokens(_Event, tag="tokens"):
    """New token ids. With n > 1, ``index`` is the sample, and a sample's end is a ``Tokens`` with its
    finish_reason."""

    token_ids: list[int] = []
    logprobs: list[dict] = []
    finish_reason: str | None = None
    index: int = 0
    prompt_logprobs: list[dict] | None = None  # with the first token, when the sampling asks


class First(_Event, tag="first"):
    """Decode's first token after a KV handoff, which the client may already have from prefill."""

    token_ids: list[int] = []
    logprobs: list[dict] = []


class Done(_Event, tag="done"):
    """The request is over: its finish reason and usage."""

    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


class Error(_Event, tag="error"):
    """The request failed; it is over."""

    message: str = ""
    status: int = 0


class Moved(_Event, tag="moved"):
    """The request went on to another engine (see :class:`MoveRequest`); this stream is over."""

    prompt_tokens: int = 0
    cached_tokens: int = 0


Event = Reserved | Tokens | First | Done | Error | Moved


encoder = msgspec.json.Encoder()


def encode_line(ev: Event) -> bytes:
    return encoder.encode(ev) + b"\n"


def decode_event(line: bytes) -> Event:
    return msgspec.json.decode(line, type=Event)

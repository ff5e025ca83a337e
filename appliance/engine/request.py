"""A request, its sampling parameters and its lifecycle state."""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.constraint import Constraint

MAX_STOP = 16  # stop strings (and stop token ids) per request
MAX_LOGPROBS = 20  # top logprobs per token
MAX_SAMPLES = 64  # samples of one prompt (n); the OpenAI API allows fewer (appliance.serve.openai_schema)
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's: -100 bans a token, 100 all but forces it
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties (OpenAI's range)
# repetition_penalty divides logits: a tiny one would make them infinite (1e-100 did, found by the fuzzer)
REPETITION_PENALTY_RANGE = (0.01, 10.0)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise ``ValueError`` naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    constraint: Constraint | None = None  # structured outputs: what the answer must match
    n: int = 1  # samples of the prompt (appliance.engine.fork): sample i draws with seed + i
    # logit adjustments before the filters (appliance.engine.logit_adjust); logprobs stay the raw ones
    presence_penalty: float = 0.0  # minus this on every token the answer already holds
    frequency_penalty: float = 0.0  # minus this times how often the answer holds the token
    repetition_penalty: float = 1.0  # CTRL's: tokens of the prompt or the answer, positive logits / this, others x
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    prompt_logprobs: int | None = None  # score the prompt's tokens too, with this many top alternatives
    min_tokens: int = 0  # vLLM's: no EOS, stop token or stop string ends the answer before this many tokens

    MAX_N = MAX_SAMPLES
    MAX_LOGPROBS = MAX_LOGPROBS
    MAX_STOP = MAX_STOP

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
              f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check(math.isfinite(self.temperature) and self.temperature >= 0,
              f"temperature must be a finite number >= 0, got {self.temperature!r}")
        check(isinstance(self.top_k, int) and self.top_k >= -1 and self.top_k != 0,
              f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        check(math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(math.isfinite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        check(len(self.stop) <= self.MAX_STOP and all(isinstance(s, str) and s for s in self.stop),
              f"stop must be at most {self.MAX_STOP} non-empty strings")
        check(self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
              f"logprobs must be between 0 and {self.MAX_LOGPROBS}, got {self.logprobs!r}")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
              f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS,
              f"prompt_logprobs must be between 0 and {self.MAX_LOGPROBS}, got {self.prompt_logprobs!r}")
        check(isinstance(self.n, int) and 1 <= self.n <= self.MAX_N, f"n must be in [1, {self.MAX_N}], got {self.n!r}")
        check(self.constraint is None or isinstance(self.constraint, Constraint),
              f"constraint must be a Constraint or None, got {type(self.constraint).__name__}")
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            check(math.isfinite(v) and lo <= v <= hi, f"{name} must be in [{lo:g}, {hi:g}], got {v!r}")
        rlo, rhi = REPETITION_PENALTY_RANGE
        check(math.isfinite(self.repetition_penalty) and rlo <= self.repetition_penalty <= rhi,
              f"repetition_penalty must be in [{rlo:g}, {rhi:g}], got {self.repetition_penalty!r}")
        bias = tuple(self.logit_bias.items()) if isinstance(self.logit_bias, dict) else tuple(self.logit_bias)
        check(len(bias) <= MAX_LOGIT_BIAS, f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
        blo, bhi = LOGIT_BIAS_RANGE
        for entry in bias:
            check(isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], int)
                  and entry[0] >= 0 and isinstance(entry[1], int | float) and math.isfinite(entry[1])
                  and blo <= entry[1] <= bhi,
                  f"logit_bias entries must be (token id >= 0, bias in [{blo:g}, {bhi:g}]), got {entry!r}")
        # NOTE: a frozen dataclass; normalize list inputs to tuples so params stay hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether a penalty or a bias changes this request's logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class Request:
    """One generation. Token ids are ``prompt_ids + output_ids``; KV lives in ``pages``.

    ``computed_len`` tokens have K/V in the cache; ``cached_len`` of those came from the prefix
    cache at admission. The next step feeds ``all_ids[computed_len:]`` (a chunk of it when
    prefilling under a token budget).
    """

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[str, Any]] = field(default_factory=list)
    # NOTE: grown in place (extend) or rebound, never edited in place: CUDA-graph decode copies only a
    # list's new entries into its page table (graph_plan.TableMemo)
    pages: list[int] = field(default_factory=list)
    computed_len: int = 0
    cached_len: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    text: str = ""
    num_preemptions: int = 0
    decoded_at: int = 0  # the scheduler's turn count when it last decoded (turns past Scheduler.max_decode)
    prefix_nodes: list[Any] = field(default_factory=list)
    # Disaggregation hooks: a prefill-only request stops after its first token and keeps its pages
    # until the transfer is done; a decode request arrives with its KV already written.
    prefill_only: bool = False
    transfer: Any = None  # the prefill side's handoff target (appliance.engine.handoff.Transfer)
    # Structured outputs: the llguidance matcher of ``params.constraint``, in step with ``output_ids``.
    matcher: Any = None
    # n > 1 (appliance.engine.fork): a child's parent id and sample index; whether a parent forked;
    # the prompt path a child keeps locked until its admission.
    group: str | None = None
    index: int = 0
    forked: bool = False
    fork_hold: list[Any] = field(default_factory=list)
    # repetition_penalty (appliance.engine.logit_adjust): the prompt's distinct tokens, found once
    prompt_tokens: Any = None
    # min_tokens: the tokens banned while the answer is shorter (EOS unless ignored, the stop tokens), set by
    # the engine; and where in the answer's text a stop string may start (the text of its first
    # min_tokens - 1 tokens cannot end it), found once the answer is that long
    early_stops: tuple[int, ...] = ()
    stop_from: int | None = None
    # params.prompt_logprobs (appliance.engine.prompt_logprobs): entry j scores prompt token j + 1
    prompt_logprobs: list[dict[str, Any]] = field(default_factory=list)
    # finish_reason "error": why (a row that could not be sampled, `appliance.engine.row_failure`)
    error: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def remaining_prefill(self) -> int:
        return self.total_len - self.computed_len


@dataclass
class RequestOutput:
    """What one step produced for one request (the whole answer so far is the request's ``output_ids``;
    a copy here per token would cost O(length) a step)."""

    request_id: str
    new_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_len: int
    cached_len: int
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    group: str | None = None  # a forked sample's parent request id (n > 1)
    index: int = 0  # the sample's index (0: the request itself)
    prompt_logprobs: list[dict[str, Any]] | None = None  # with the first token, when the params ask
    error: str | None = None  # finish_reason "error": why this request failed (its group's, with n > 1)
    error_status: int = 500  # with ``error``: 400 when the request's own parameters left no token

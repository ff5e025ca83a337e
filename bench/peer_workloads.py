"""The fixed workloads of `pdbox bench peer`: the shapes pdbox is measured against vLLM with.

Each is what `vllm bench serve --backend openai-chat --dataset-name random --random-range-ratio 0
--ignore-eos` sends with the matching `--random-input-len/--random-output-len/--num-prompts/--request-rate
/--max-concurrency`: every request has exactly the prompt and answer length, arrivals are Poisson at the
rate (`inf`: all at once). Each has its own seed offset, so a prefix cache cannot hit across workloads.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

from bench.arrivals import Schedule


@dataclass(frozen=True)
class PeerMetric:
    """One figure of a run's result.json (vLLM's key), and which way is better."""

    key: str
    label: str
    better: Literal["higher", "lower"]


OUTPUT_TOK_S = PeerMetric("output_throughput", "output tok/s", "higher")
TTFT_P50 = PeerMetric("median_ttft_ms", "TTFT p50 (ms)", "lower")
TTFT_P99 = PeerMetric("p99_ttft_ms", "TTFT p99 (ms)", "lower")
TPOT_P50 = PeerMetric("median_tpot_ms", "TPOT p50 (ms)", "lower")


@dataclass(frozen=True)
class PeerWorkload:
    """A fixed shape: every request has `prompt_len` tokens in and `output_len` out, sent at `rate`
    req/s (Poisson; `inf`: all at once) with at most `max_concurrency` in flight."""

    name: str
    kind: str
    prompt_len: int
    output_len: int
    num_requests: int
    rate: float
    max_concurrency: int | None
    seed_offset: int
    metrics: tuple[PeerMetric, ...]

    def __post_init__(self) -> None:
        if min(self.prompt_len, self.output_len, self.num_requests) < 1:
            raise ValueError(f"workload {self.name}: lengths and request count must be >= 1")
        if not 0 < self.seed_offset < 100:
            raise ValueError(f"workload {self.name}: the seed offset must be in 1..99")

    @property
    def label(self) -> str:
        shape = f"{self.kind} {self.prompt_len} in / {self.output_len} out"
        if math.isinf(self.rate) and (self.max_concurrency or self.num_requests) < self.num_requests:
            return f"{shape}, {self.num_requests} requests, {self.max_concurrency} at a time"
        if math.isinf(self.rate):
            return f"{shape}, {self.num_requests} requests at once"
        return f"{shape} at {self.rate:g} req/s"

    def seed(self, base_seed: int) -> int:
        """This workload's seed: fresh per workload and per --seed, one integer as vLLM's --seed takes."""
        return base_seed * 100 + self.seed_offset

    def schedule(self, base_seed: int) -> Schedule:
        return Schedule(self.rate, self.max_concurrency, "poisson", self.seed(base_seed))

    def sized(self, scale: float, num_requests: int | None) -> PeerWorkload:
        """Shrunk for smoke tests: `scale` times the requests and prompt tokens, arrivals 1/scale as far
        apart (a run lasts about scale² as long); `num_requests` then sets the count exactly."""
        if not 0 < scale <= 1:
            raise ValueError(f"--scale must be in (0, 1], got {scale}")
        if num_requests is not None and num_requests < 1:
            raise ValueError(f"--num-requests must be at least 1, got {num_requests}")
        count = num_requests if num_requests is not None else max(1, round(self.num_requests * scale))
        return replace(self, num_requests=count, prompt_len=max(4, round(self.prompt_len * scale)),
                       rate=self.rate / scale)

    def vllm_command(self, url: str, model: str, base_seed: int) -> str:
        """The `vllm bench serve` line that sends this shape (with vLLM's own prompts, not these)."""
        args = ["vllm", "bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                "--base-url", url, "--model", model, "--dataset-name", "random",
                "--random-input-len", str(self.prompt_len), "--random-output-len", str(self.output_len),
                "--random-range-ratio", "0", "--ignore-eos", "--num-prompts", str(self.num_requests),
                "--request-rate", "inf" if math.isinf(self.rate) else f"{self.rate:g}"]
        if self.max_concurrency is not None:
            args += ["--max-concurrency", str(self.max_concurrency)]
        return shlex.join([*args, "--seed", str(self.seed(base_seed))])

    def describe(self, base_seed: int) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "kind": self.kind, "prompt_len": self.prompt_len,
                "output_len": self.output_len, "num_requests": self.num_requests, "seed": self.seed(base_seed),
                **self.schedule(base_seed).describe()}


PEER_WORKLOADS: Mapping[str, PeerWorkload] = MappingProxyType({
    w.name: w for w in (
        PeerWorkload("chat-burst", "chat", 256, 64, 48, math.inf, 48, 1, (OUTPUT_TOK_S,)),
        PeerWorkload("chat-1rps", "chat", 256, 64, 60, 1.0, None, 2, (TTFT_P50, TPOT_P50)),
        PeerWorkload("chat-2rps", "chat", 256, 64, 60, 2.0, None, 3, (TTFT_P50, TPOT_P50)),
        PeerWorkload("rag-0.3rps", "rag", 1536, 32, 30, 0.3, None, 4, (TTFT_P50, TTFT_P99, TPOT_P50)),
    )
})


def parse_workloads(names: str) -> tuple[PeerWorkload, ...]:
    """`a,b` -> those workloads in the table's order; an unknown name raises ValueError naming the known."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in PEER_WORKLOADS]
    if unknown or not wanted:
        raise ValueError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(PEER_WORKLOADS)}")
    return tuple(w for name, w in PEER_WORKLOADS.items() if name in wanted)

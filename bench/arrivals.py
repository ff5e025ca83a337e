"""When requests are sent: open-loop arrivals at a rate (Poisson or constant) or a closed loop of C slots.

- `rate=R, process="poisson"`: gaps between sends are exponential with mean 1/R (vLLM's default,
  `--burstiness 1`); the first request goes out at t=0. Unlike vLLM the gaps are not rescaled to
  sum to exactly n/R: the process is a plain seeded Poisson process.
- `rate=R, process="constant"`: one request every 1/R seconds.
- `max_concurrency=C` with no rate: a closed loop, C requests in flight, a new one as soon as one ends.
- both: requests arrive at rate R but at most C are in flight (vLLM's `--max-concurrency`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ArrivalProcess = Literal["poisson", "constant"]
_ARRIVAL_STREAM = 4  # NOTE: distinct from the workload's streams under the same seed


@dataclass(frozen=True)
class Schedule:
    """An arrival schedule; `offsets(n)` gives the send times, in seconds from the start of the run."""

    rate: float = math.inf
    max_concurrency: int | None = None
    process: ArrivalProcess = "poisson"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"the request rate must be positive, got {self.rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.max_concurrency}")
        if math.isinf(self.rate) and self.max_concurrency is None:
            raise ValueError("give a request rate (--rate R) or a concurrency (--concurrency C)")
        if self.process not in ("poisson", "constant"):
            raise ValueError(f"arrival process must be 'poisson' or 'constant', got {self.process!r}")

    @property
    def closed_loop(self) -> bool:
        return math.isinf(self.rate)

    def offsets(self, num_requests: int) -> list[float]:
        """Seconds after the start at which each of `num_requests` requests becomes ready to send."""
        if num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {num_requests}")
        if num_requests == 0:
            return []
        if self.closed_loop:
            return [0.0] * num_requests
        if self.process == "constant":
            return [i / self.rate for i in range(num_requests)]
        rng = np.random.default_rng([self.seed, _ARRIVAL_STREAM])
        gaps = rng.exponential(1.0 / self.rate, size=num_requests - 1)
        return [0.0, *np.cumsum(gaps).tolist()]

    def describe(self) -> dict[str, Any]:
        """The vLLM-named fields for result.json (`request_rate` is the string "inf" in a closed loop)."""
        return {
            "request_rate": "inf" if self.closed_loop else self.rate,
            "max_concurrency": self.max_concurrency,
            "arrival_process": "closed-loop" if self.closed_loop else self.process,
        }

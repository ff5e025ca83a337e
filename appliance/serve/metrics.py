"""A small Prometheus text-format registry: counters, gauges and histograms with labels."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


class Metric:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "counter")
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def render(self, base: dict[str, str]) -> list[str]:
        return [f"{self.name}{_labels({**base, **dict(k)})} {v}" for k, v in self.values.items()]


class Gauge(Metric):
    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "gauge")
        self.values: dict[tuple, float] = {}

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self.values[tuple(sorted(labels.items()))] = float(value)

    def render(self, base: dict[str, str]) -> list[str]:
        return [f"{self.name}{_labels({**base, **dict(k)})} {v}" for k, v in self.values.items()]


class Histogram(Metric):
    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, "histogram")
        self.buckets = tuple(buckets)
        self.series: dict[tuple, list[float]] = {}  # counts per bucket + [+Inf count, sum]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            s = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            s[bisect.bisect_left(self.buckets, value)] += 1
            s[-1] += value

    def render(self, base: dict[str, str]) -> list[str]:
        out = []
        for key, s in self.series.items():
            labels = {**base, **dict(key)}
            cum = 0.0
            for le, count in zip(self.buckets, s):
                cum += count
                out.append(f"{self.name}_bucket{_labels({**labels, 'le': repr(le)})} {cum}")
            cum += s[len(self.buckets)]
            out.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {cum}")
            out.append(f"{self.name}_count{_labels(labels)} {cum}")
            out.append(f"{self.name}_sum{_labels(labels)} {s[-1]}")
        return out


class Registry:
    """Metrics of one process; rendered with its constant labels (``role``, ``worker``)."""

    def __init__(self, **base_labels: str) -> None:
        self.base = dict(base_labels)
        self.metrics: dict[str, Metric] = {}

    def counter(self, name: str, help_text: str) -> Counter:
        return self._get(name, lambda: Counter(name, help_text))  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str) -> Gauge:
        return self._get(name, lambda: Gauge(name, help_text))  # type: ignore[return-value]

    def histogram(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._get(name, lambda: Histogram(name, help_text, buckets))  # type: ignore[return-value]

    def _get(self, name: str, make) -> Metric:
        if name not in self.metrics:
            self.metrics[name] = make()
        return self.metrics[name]

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics.values():
            lines += m.header() + m.render(self.base)  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"

"""A small Prometheus text-format registry: counters, gauges and histograms with labels.

Every process renders its metrics with constant labels ``role`` and ``worker`` (the router uses
``role="router"``); a series may override them to describe another process (the router's
``pdbox_worker_restarts_total`` carries the restarted worker's labels).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LabelKey = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _key(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _num(value: float) -> str:
    return repr(float(value))


class Metric:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self, base: dict[str, str]) -> list[str]:
        raise NotImplementedError


class _Valued(Metric):
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        super().__init__(name, help_text, kind)
        self.values: dict[LabelKey, float] = {}

    def get(self, **labels: str) -> float:
        return self.values.get(_key(labels), 0.0)

    def clear(self) -> None:
        """Forget every series (before re-setting those that still exist)."""
        with self._lock:
            self.values.clear()

    def render(self, base: dict[str, str]) -> list[str]:
        with self._lock:
            items = list(self.values.items())
        return [f"{self.name}{_labels({**base, **dict(k)})} {_num(v)}" for k, v in items]


class Counter(_Valued):
    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "counter")

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        with self._lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def set_total(self, total: float, **labels: str) -> None:
        """Mirror a monotonic count kept elsewhere (a transport's byte count, a cache's hits)."""
        with self._lock:
            self.values[_key(labels)] = float(total)


class Gauge(_Valued):
    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "gauge")

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self.values[_key(labels)] = float(value)


class Histogram(Metric):
    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, "histogram")
        self.buckets = tuple(float(b) for b in buckets)
        self.series: dict[LabelKey, list[float]] = {}  # counts per bucket + [+Inf count, sum]

    def observe(self, value: float, **labels: str) -> None:
        key = _key(labels)
        with self._lock:
            s = self.series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            s[bisect.bisect_left(self.buckets, value)] += 1
            s[-1] += value

    def render(self, base: dict[str, str]) -> list[str]:
        with self._lock:
            items = [(k, list(s)) for k, s in self.series.items()]
        out = []
        for key, s in items:
            labels = {**base, **dict(key)}
            cum = 0.0
            for le, count in zip(self.buckets, s):
                cum += count
                out.append(f"{self.name}_bucket{_labels({**labels, 'le': repr(le)})} {_num(cum)}")
            cum += s[len(self.buckets)]
            out.append(f"{self.name}_bucket{_labels({**labels, 'le': '+Inf'})} {_num(cum)}")
            out.append(f"{self.name}_count{_labels(labels)} {_num(cum)}")
            out.append(f"{self.name}_sum{_labels(labels)} {_num(s[-1])}")
        return out


class Registry:
    """Metrics of one process; rendered with its constant labels (``role``, ``worker``)."""

    def __init__(self, **base_labels: str) -> None:
        self.base = dict(base_labels)
        self.metrics: dict[str, Metric] = {}

    def counter(self, name: str, help_text: str) -> Counter:
        return self._get(name, Counter, lambda: Counter(name, help_text))

    def gauge(self, name: str, help_text: str) -> Gauge:
        return self._get(name, Gauge, lambda: Gauge(name, help_text))

    def histogram(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return self._get(name, Histogram, lambda: Histogram(name, help_text, buckets))

    def _get(self, name: str, kind: type, make: Callable[[], Metric]):
        m = self.metrics.get(name)
        if m is None:
            m = self.metrics[name] = make()
        elif not isinstance(m, kind):
            raise ValueError(f"metric {name} is a {m.kind}, not a {kind.__name__.lower()}")
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in list(self.metrics.values()):
            lines += m.header() + m.render(self.base)
        return "\n".join(lines) + "\n"

"""Prometheus metrics of one process, kept by ``prometheus_client`` in a CollectorRegistry of its own.

Every series carries the labels ``role`` and ``worker`` of the process that renders it (the router
uses ``role="router"``); a series may override them to describe another process (the router's
``pdbox_worker_restarts_total`` carries the restarted worker's labels). Each metric declares its own
label names; call sites pass them as keyword arguments (``errors.inc(kind="502")``).

Kinds: :class:`Counter`, :class:`Gauge` and :class:`Histogram` wrap prometheus_client's own;
:class:`Total` is a counter that mirrors a count kept elsewhere (a transport's bytes, the prefix
cache's hits), which prometheus_client's Counter cannot be set to.

Cost (``python -m bench.prom_cost``, 2 shared CPU cores): recording is as cheap as the hand-written
registry this replaced (~7 us an observe); writing is about 3x dearer (6.7 ms for a 206-line worker
text against 2.3 ms). A worker writes its text off the engine thread; the router writes its own
(~100 lines) on its event loop, once per scrape of ``/metrics``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import prometheus_client as prom
from prometheus_client.metrics_core import CounterMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

BASE_LABELS = ("role", "worker")


class _Wrapped:
    """One prometheus_client metric, its series filled in with the process's ``role`` and ``worker``."""

    kind = ""

    def __init__(self, metric: Any, labels: tuple[str, ...], base: dict[str, str]) -> None:
        self._m = metric
        self.labels = labels
        self._base = base
        # NOTE: prometheus_client's labels() builds and checks the label set on every call (~2x the
        # cost of an observe); the engine thread records per step, so each series is looked up once.
        self._children: dict[tuple[tuple[str, str], ...], Any] = {}

    def _child(self, labels: dict[str, str]) -> Any:
        key = tuple(labels.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._m.labels(**{**self._base, **labels})
        return child

    def clear(self) -> None:
        """Forget every series (before re-setting those that still exist)."""
        self._m.clear()
        self._children = {}

    def get(self, **labels: str) -> float:
        """The value of one series (0 when it was never set)."""
        want = {k: str(v) for k, v in {**self._base, **labels}.items()}
        for family in self._m.collect():
            for s in family.samples:
                if s.labels == want and s.name in (family.name, family.name + "_total"):
                    return float(s.value)
        return 0.0


class Counter(_Wrapped):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).inc(amount)


class Gauge(_Wrapped):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)


class Histogram(_Wrapped):
    kind = "histogram"

    def observe(self, value: float, **labels: str) -> None:
        self._child(labels).observe(value)


class Total:
    """A counter whose value mirrors a monotonic count kept elsewhere; a collector of its own."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...], base: dict[str, str]) -> None:
        self.name, self.help, self.labels, self._base = name, help_text, labels, base
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        full = {**self._base, **labels}
        if set(full) != set(self.labels):
            raise ValueError(f"{self.name} takes the labels {self.labels}, not {tuple(full)}")
        return tuple(str(full[n]) for n in self.labels)

    def set_total(self, total: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(total)

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        with self._lock:
            items = list(self._values.items())
        for key, value in items:
            family.add_metric(key, value)
        yield family


class _Exposition:
    """The registry as served: without the ``_created`` series prometheus_client adds to counters and
    histograms (pdbox's text never had them; the switch that drops them at the source is a global)."""

    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            created = family.name + "_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


M = TypeVar("M")


class Registry:
    """Metrics of one process; every series carries its constant labels (``role``, ``worker``)."""

    def __init__(self, **base_labels: str) -> None:
        self.base = dict(base_labels)
        self.registry = prom.CollectorRegistry()
        self.metrics: dict[str, _Wrapped | Total] = {}

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        if not name.endswith("_total"):  # prometheus_client would append it
            raise ValueError(f"counter {name} must end in _total")
        return self._get(name, Counter, labels, lambda names: Counter(
            prom.Counter(name, help_text, names, registry=self.registry), names, self.base))

    def total(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Total:
        def make(names: tuple[str, ...]) -> Total:
            t = Total(name, help_text, names, self.base)
            self.registry.register(t)
            return t
        return self._get(name, Total, labels, make)

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get(name, Gauge, labels, lambda names: Gauge(
            prom.Gauge(name, help_text, names, registry=self.registry), names, self.base))

    def histogram(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS,
                  labels: Sequence[str] = ()) -> Histogram:
        return self._get(name, Histogram, labels, lambda names: Histogram(
            prom.Histogram(name, help_text, names, registry=self.registry, buckets=buckets), names, self.base))

    def _get(self, name: str, kind: type[M], labels: Sequence[str], make: Callable[[tuple[str, ...]], M]) -> M:
        names = tuple(self.base) + tuple(n for n in labels if n not in self.base)
        m = self.metrics.get(name)
        if m is None:
            m = self.metrics[name] = make(names)  # type: ignore[assignment]
        elif not isinstance(m, kind):
            raise ValueError(f"metric {name} is a {m.kind}, not a {kind.__name__.lower()}")
        elif m.labels != names:
            raise ValueError(f"metric {name} has the labels {m.labels}, not {names}")
        return m  # type: ignore[return-value]

    def render(self) -> str:
        return prom.generate_latest(_Exposition(self.registry)).decode()

"""Prometheus text exposition: samples (parsed by prometheus_client), label matching, histogram quantiles."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client.

    Raises ``ValueError`` on text that is not an exposition, naming what it choked on.
    """
    try:
        return [Sample(s.name, s.labels, float(s.value))
                for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:
        raise ValueError(f"not a Prometheus text exposition: {exc}") from exc


def _matches(labels: Mapping[str, str], match: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


@dataclass(frozen=True)
class Histogram:
    """One histogram, possibly summed over several series: cumulative ``(le, count)`` buckets."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    total: float

    def minus(self, older: Histogram) -> Histogram:
        """Observations made since ``older`` (same buckets; a reset counts from zero)."""
        if older.count > self.count or [le for le, _ in older.buckets] != [le for le, _ in self.buckets]:
            return self
        prev = dict(older.buckets)
        return Histogram(tuple((le, c - prev[le]) for le, c in self.buckets), self.count - older.count,
                         self.total - older.total)

    def quantile(self, q: float) -> float:
        """Estimate like PromQL's ``histogram_quantile``: linear inside the bucket. NaN when empty.

        A quantile in the +Inf bucket returns the largest finite bound.
        """
        if self.count <= 0 or not self.buckets:
            return math.nan
        rank = q * self.count
        lower_le, lower_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return lower_le
                if c == lower_c:
                    return le
                return lower_le + (le - lower_le) * (rank - lower_c) / (c - lower_c)
            lower_le, lower_c = le, c
        return lower_le

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


EMPTY = Histogram((), 0.0, 0.0)


class Metrics:
    """Samples of one scrape, indexed by name; lookups sum over series matching some labels."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self.by_name: dict[str, list[Sample]] = {}
        for s in samples:
            self.by_name.setdefault(s.name, []).append(s)

    @classmethod
    def from_text(cls, text: str) -> Metrics:
        return cls(parse(text))

    def series(self, name: str, **match: str) -> list[Sample]:
        return [s for s in self.by_name.get(name, []) if _matches(s.labels, match)]

    def value(self, name: str, default: float = 0.0, **match: str) -> float:
        """The sum over series that match (``default`` when there are none)."""
        found = self.series(name, **match)
        return sum(s.value for s in found) if found else default

    def has(self, name: str, **match: str) -> bool:
        return bool(self.series(name, **match))

    def label_values(self, name: str, label: str, **match: str) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.series(name, **match):
            if label in s.labels:
                seen[s.labels[label]] = None
        return list(seen)

    def histogram(self, name: str, **match: str) -> Histogram:
        """The histogram ``name``, summed over matching series that share one bucket layout."""
        buckets: dict[float, float] = {}
        for s in self.series(f"{name}_bucket", **match):
            le = float(s.labels.get("le", "+Inf"))
            buckets[le] = buckets.get(le, 0.0) + s.value
        if not buckets:
            return EMPTY
        return Histogram(tuple(sorted(buckets.items())), self.value(f"{name}_count", **match),
                         self.value(f"{name}_sum", **match))

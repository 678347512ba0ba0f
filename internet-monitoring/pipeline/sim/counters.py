"""Counters scraped from ``/metrics`` across process restarts (pure).

A killed server restarts its counters at zero, and the server's mirror of a sensor's retry
counter drops when the sensor restarts. ``RestartingCounters`` keeps a running total per
series: when a value goes down, the last value seen before the drop is banked. Increments
between the last scrape and a kill are not seen, so totals are lower bounds.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]


def parse_samples(text: str, names: Iterable[str]) -> list[tuple[str, dict[str, str], float]]:
    """``(sample name, labels, value)`` for the samples called one of ``names``."""
    wanted = set(names)
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out.append((sample.name, dict(sample.labels), float(sample.value)))
    return out


class RestartingCounters:
    """Totals of series that may restart from zero."""

    def __init__(self) -> None:
        self._last: dict[SeriesKey, float] = {}
        self._banked: dict[SeriesKey, float] = {}

    def observe(self, name: str, labels: Mapping[str, str], value: float) -> None:
        key = (name, tuple(sorted(labels.items())))
        last = self._last.get(key)
        if last is not None and value < last:
            self._banked[key] = self._banked.get(key, 0.0) + last
        self._last[key] = value

    def observe_text(self, text: str, names: Iterable[str]) -> None:
        for name, labels, value in parse_samples(text, names):
            self.observe(name, labels, value)

    def total(self, name: str,
              where: Callable[[Mapping[str, str]], bool] = lambda labels: True) -> float:
        """Sum over the series of ``name`` whose labels satisfy ``where``."""
        result = 0.0
        for key, last in self._last.items():
            if key[0] == name and where(dict(key[1])):
                result += last + self._banked.get(key, 0.0)
        return result

    def seen(self, name: str) -> bool:
        return any(key[0] == name for key in self._last)

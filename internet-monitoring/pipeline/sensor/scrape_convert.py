"""What one scrape becomes: remote-write series, as Prometheus would store them. Sans-I/O.

Labels: the exporter's labels plus ``job`` (the target's job) and ``instance`` (host:port
of its URL); an exporter label ``job`` or ``instance`` is kept as ``exported_job`` /
``exported_instance`` (Prometheus's default ``honor_labels: false``). Timestamps: the
scrape's own start time in ms, or the exposition's timestamp where the exporter gives one.
Every scrape also yields ``up`` (1, or 0 when the scrape failed),
``scrape_duration_seconds`` and ``scrape_samples_scraped``, as Prometheus adds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from pipeline.common.remote_write import Series

TARGET_LABELS = ("job", "instance")


class ExpositionError(ValueError):
    """The body is not in the Prometheus text exposition format."""


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    instance: str


def parse_exposition(text: str, target: ScrapeTarget, scrape_ms: int) -> list[Series]:
    """The samples of ``text`` as series (one sample each); ExpositionError if unparsable."""
    try:
        families = list(text_string_to_metric_families(text))
        out: list[Series] = []
        for family in families:
            for sample in family.samples:
                labels = _target_labels(dict(sample.labels), target)
                labels["__name__"] = sample.name
                stamp = scrape_ms if sample.timestamp is None else _ms(sample.timestamp)
                out.append(Series(labels=tuple(sorted(labels.items())),
                                  samples=((stamp, float(sample.value)),)))
        return out
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ExpositionError(f"not the text exposition format: {exc}") from exc


def _ms(timestamp: object) -> int:
    seconds = float(timestamp)  # type: ignore[arg-type]
    return round(seconds * 1000)


def _target_labels(labels: dict[str, str], target: ScrapeTarget) -> dict[str, str]:
    for name in TARGET_LABELS:
        if name in labels:
            labels[f"exported_{name}"] = labels.pop(name)
    labels["job"] = target.job
    labels["instance"] = target.instance
    return labels


def report_series(target: ScrapeTarget, scrape_ms: int, *, up: bool, duration_s: float,
                  samples: int) -> list[Series]:
    """``up``, ``scrape_duration_seconds`` and ``scrape_samples_scraped`` of one scrape."""
    base = (("instance", target.instance), ("job", target.job))

    def one(name: str, value: float) -> Series:
        return Series(labels=tuple(sorted((*base, ("__name__", name)))),
                      samples=((scrape_ms, value),))

    return [one("up", 1.0 if up else 0.0), one("scrape_duration_seconds", duration_s),
            one("scrape_samples_scraped", float(samples))]

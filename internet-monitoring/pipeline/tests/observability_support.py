"""Helpers of the observability tests: real traffic against a running PipelineServer and
the reading of ``/metrics`` as Prometheus would (HTTP + the text-format parser)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any, Iterable, Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pipeline.server.app import PipelineServer
from pipeline.tests.server_support import chunk_docs, eventually, iso_now, urls

SampleKey = tuple[str, frozenset[tuple[str, str]]]


async def scrape(http: aiohttp.ClientSession, base_url: str) -> str:
    async with http.get(base_url + "/metrics") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/plain"
        return await resp.text()


def parse_samples(text: str) -> dict[SampleKey, float]:
    """Every sample of an exposition, keyed by (sample name, label set)."""
    out: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Mapping[SampleKey, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def exported_names(text: str) -> set[str]:
    """Every series name a PromQL query can select from this exposition: sample names, and
    for families declared without samples yet (labelled metrics before their first
    observation) the names their type produces."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created", ""), "info": ("_info",),
                "unknown": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan", "atan2", "start", "end"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (with Grafana variables) selects.

    Strings, label matchers ``{...}``, ranges ``[...]`` and the label lists of ``by``,
    ``without``, ``on``, ``ignoring`` and ``group_*`` are removed first; then every
    identifier not followed by ``(`` (a function or aggregation) and not a keyword is a
    metric name. Grafana's ``label_values(metric, label)`` names ``metric``."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)[^,)]*,[^)]*\)", r" \1 ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def heartbeat_envelope(sensor_id: str, capabilities: Iterable[str], **body: Any) -> str:
    doc = {"software_version": "obs-test", "last_committed_sequence": 0, "queue_depth": 0,
           "clock_skew_ms": 0.0}
    doc.update(body)
    return json.dumps({"schema_version": "1.0.0", "sensor_id": sensor_id, "sent_at": iso_now(),
                       "capabilities": list(capabilities), "body_type": "heartbeat",
                       "body": doc})


async def connect_control(http: aiohttp.ClientSession, server: PipelineServer, sensor_id: str,
                          token: str) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(urls(server)["control"],
                                 headers={"X-Sensor-ID": sensor_id,
                                          "Authorization": f"Bearer {token}"})


async def post_doc(http: aiohttp.ClientSession, server: PipelineServer, doc: dict[str, Any],
                   token: str) -> tuple[int, dict[str, Any]]:
    async with http.post(urls(server)["ingest"] + "/v1/ingest/chunk", json=doc,
                         headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json()


def event_docs(sensor_id: str, payload: Mapping[str, Any], first_sequence: int,
               ) -> tuple[str, list[dict[str, Any]]]:
    return chunk_docs(sensor_id, json.dumps(payload).encode(), first_sequence,
                      logical_timestamp_ms=int(time.time() * 1000))


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> None:
    await eventually(predicate, timeout, interval=interval)


def agent_config(server: PipelineServer, tmp_path: Any, sensor_id: str, token: str,
                 **sections: Any) -> Any:
    """A sensor config pointed at ``server``: fast heartbeats and backoff, own queue file."""
    from pipeline.common.config import sensor_config_from_dict

    doc: dict[str, Any] = {
        "sensor_id": sensor_id, "token": token, "heartbeat_interval": 0.5,
        "capabilities": ["chunks", "heartbeats", "epoch", "server_time", "heartbeat_stats"],
        "queue": {"path": str(tmp_path / f"queue-{sensor_id}.db")},
        "control": {"url": urls(server)["control"]},
        "ingest": {"url": urls(server)["ingest"] + "/v1/ingest/chunk"},
        "backoff": {"initial_s": 0.05, "max_s": 0.2},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            doc.setdefault(name, {}).update(values)
        else:
            doc[name] = values
    return sensor_config_from_dict(doc)


class RunningAgent:
    """``async with RunningAgent(agent):`` runs ``agent.run()`` as a task and stops it."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Any:
        self.task = asyncio.get_running_loop().create_task(self.agent.run())
        return self.agent

    async def __aexit__(self, *exc: object) -> None:
        self.agent.stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout=15)

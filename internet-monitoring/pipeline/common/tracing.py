"""Trace propagation: a W3C ``traceparent`` from submit to commit, OpenTelemetry optional.

The trace of one event::

    sensor.submit               the event enters the queue; its traceparent is stored
    │                           with it (reserved attribute ``traceparent``)
    └── sensor.post_chunk       one span per POST attempt; the chunk carries this span's
        │                       traceparent in ``attributes.traceparent``
        └── server.ingest       (server) continues the chunk's traceparent
            ├── server.verify   token and identity of the chunk's sensor
            └── server.commit   group commit until durable
                ├── server.ack       ChunkAck queued to the sensor's control socket
                └── server.snapshot  the event completed: snapshot cache, stream, gauges

The attribute is ordinary chunk data for protocol 1.0 (``attributes`` is a free string
map), so a server that knows nothing of tracing stores it and answers as usual. Each hop
replaces it with its own span's traceparent, as W3C trace context prescribes.

The OpenTelemetry SDK and OTLP exporter are the optional extra ``openuxi-pipeline[otel]``,
imported only when tracing is enabled. Without them, or disabled, ``Tracing`` is a no-op:
spans record nothing and an incoming traceparent passes through unchanged.
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol

if TYPE_CHECKING:
    from pipeline.common.config import TracingConfig
    from pipeline.common.messages import Chunk

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
AttributeValue = str | int | float | bool


def is_valid_traceparent(value: object) -> bool:
    """A version-00 W3C traceparent with non-zero trace and span ids."""
    if not isinstance(value, str):
        return False
    match = _TRACEPARENT_RE.fullmatch(value)
    if match is None:
        return False
    return set(match.group(1)) != {"0"} and set(match.group(2)) != {"0"}


def trace_id_of(traceparent: str) -> str:
    """The 32-hex trace id of a valid traceparent."""
    return traceparent.split("-")[1]


def traceparent_of(attributes: Mapping[str, str]) -> str | None:
    value = attributes.get(TRACEPARENT)
    return value if is_valid_traceparent(value) else None


def with_traceparent(chunk: Chunk, traceparent: str | None) -> Chunk:
    """The chunk carrying ``traceparent`` (unchanged when None or already carried)."""
    if traceparent is None or chunk.attributes.get(TRACEPARENT) == traceparent:
        return chunk
    return replace(chunk, attributes={**chunk.attributes, TRACEPARENT: traceparent})


class Span(Protocol):
    @property
    def traceparent(self) -> str | None: ...
    def set_attribute(self, key: str, value: AttributeValue) -> None: ...


class _NoopSpan:
    """Records nothing; hands the incoming traceparent on so propagation survives a hop
    whose tracing is off. It is its own context manager, and the parent is checked only
    when asked for: a disabled tracer costs one small object per ``span()`` call."""

    __slots__ = ("_parent",)

    def __init__(self, parent: str | None) -> None:
        self._parent = parent

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None  # an exception in the body propagates unchanged

    @property
    def traceparent(self) -> str | None:
        parent = self._parent
        return parent if is_valid_traceparent(parent) else None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        return None


_NO_PARENT = _NoopSpan(None)


class _OtelSpan:
    def __init__(self, span: Any, propagator: Any, trace_api: Any) -> None:
        self._span = span
        self._propagator = propagator
        self._trace = trace_api

    @property
    def traceparent(self) -> str | None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(self._span))
        value = carrier.get(TRACEPARENT)
        return value if is_valid_traceparent(value) else None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, value)


class Tracing:
    """The one tracer facade both programs use; ``Tracing()`` is the no-op one."""

    def __init__(self, tracer: Any = None, *, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider
        self._propagator: Any = None
        self._trace: Any = None
        if tracer is not None:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._trace = trace
            self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_provider(cls, provider: Any, name: str = "pipeline") -> Tracing:
        """Trace into an existing ``TracerProvider`` (tests pass one with an in-memory
        exporter; the caller keeps ownership of it)."""
        return cls(provider.get_tracer(name))

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, *, parent: str | None = None,
             attributes: Mapping[str, AttributeValue] | None = None
             ) -> AbstractContextManager[Span]:
        """A span around the ``with`` body. ``parent`` is a traceparent to continue (from
        a queue row or a chunk); None continues the current span of this task, if any. An
        exception leaving the body is recorded on the span and re-raised. Disabled, this is
        a no-op object (no generator, no validation until ``traceparent`` is read): the
        ingest path opens several spans per chunk."""
        if self._tracer is None:
            return _NO_PARENT if parent is None else _NoopSpan(parent)
        return self._otel_span(name, parent, attributes)

    @contextmanager
    def _otel_span(self, name: str, parent: str | None,
                   attributes: Mapping[str, AttributeValue] | None) -> Iterator[Span]:
        context = None
        if is_valid_traceparent(parent):
            context = self._propagator.extract({TRACEPARENT: parent})
        with self._tracer.start_as_current_span(name, context=context,
                                                attributes=dict(attributes or {})) as span:
            yield _OtelSpan(span, self._propagator, self._trace)

    def shutdown(self) -> None:
        """Flush and stop the exporter this object created (not an injected provider)."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None


def setup_tracing(config: TracingConfig | None, default_service: str) -> Tracing:
    """The process's tracer from its ``tracing`` config section: no-op when disabled or
    when the ``otel`` extra is not installed (logged once at start)."""
    if config is None or not config.enabled:
        return Tracing()
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("tracing_unavailable reason=opentelemetry_sdk_missing "
                    "hint=pip_install_openuxi-pipeline[otel] action=no_op_tracer")
        return Tracing()
    service = config.service_name or default_service
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = "none"
    if config.otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("tracing_exporter_unavailable reason=otlp_exporter_missing "
                        "hint=pip_install_openuxi-pipeline[otel]")
        else:
            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
            exporter = config.otlp_endpoint
    log.info("tracing_enabled service=%s exporter=%s", service, exporter)
    return Tracing(provider.get_tracer("pipeline"), provider=provider)

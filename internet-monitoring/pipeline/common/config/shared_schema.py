"""Configuration sections both programs use."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common.config.checks import check_url


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing (optional extra ``openuxi-pipeline[otel]``). Enabled without
    the extra installed, the process logs a warning and runs with a no-op tracer."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = ""

    def validate(self, at: str) -> None:
        if self.otlp_endpoint:
            check_url(at, "otlp_endpoint", self.otlp_endpoint, ("http", "https"))


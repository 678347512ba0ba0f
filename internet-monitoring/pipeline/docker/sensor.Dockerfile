# Open UXI pipeline sensor agent. Build context: the internet-monitoring/ folder alone
#   docker build -f pipeline/docker/sensor.Dockerfile -t openuxi/pipeline-agent .
# Installs only the core dependencies (the "sensor" extra): no server-only packages.
# Config read-only at /config/sensor.yml, TLS files read-only at /tls, the queue in the
# volume at /var/lib/pipeline. Runs as uid 10001 (the Ansible role makes the rendered
# config and TLS files readable by it).
FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml ./
COPY pipeline ./pipeline
RUN python -m venv /opt/openuxi-pipeline \
    && /opt/openuxi-pipeline/bin/pip install --no-cache-dir ".[sensor]"

FROM python:3.12-slim-bookworm
RUN groupadd --system --gid 10001 pipeline \
    && useradd --system --uid 10001 --gid pipeline --home-dir /var/lib/pipeline \
       --no-create-home --shell /usr/sbin/nologin pipeline \
    && install -d -o pipeline -g pipeline -m 0700 /var/lib/pipeline
COPY --from=build /opt/openuxi-pipeline /opt/openuxi-pipeline
# The agent's /healthz and /metrics on loopback (the container shares the host network).
# MALLOC_ARENA_MAX=2: two glibc malloc arenas, not one per worker thread (a lower memory
# peak while draining; docs/performance.md, remote_write section).
ENV PATH=/opt/openuxi-pipeline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIPELINE_SENSOR__METRICS__LISTEN=127.0.0.1:9119 \
    MALLOC_ARENA_MAX=2
USER 10001:10001
WORKDIR /var/lib/pipeline
VOLUME ["/var/lib/pipeline"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["pipeline-sensor", "health", "--config", "/config/sensor.yml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pipeline-sensor"]
CMD ["run", "--config", "/config/sensor.yml"]

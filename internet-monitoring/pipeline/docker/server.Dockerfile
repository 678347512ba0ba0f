# Open UXI pipeline server. Build context: the internet-monitoring/ folder alone
#   docker build -f pipeline/docker/server.Dockerfile -t openuxi/pipeline-server .
# Config read-only at /config/server.yml, TLS files read-only at /tls, the SQLite store in
# the volume at /var/lib/pipeline. Runs as uid 10001 (the Ansible role makes the rendered
# config and TLS files readable by it).
FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml ./
COPY pipeline ./pipeline
RUN python -m venv /opt/openuxi-pipeline \
    && /opt/openuxi-pipeline/bin/pip install --no-cache-dir ".[server]"

FROM python:3.12-slim-bookworm
RUN groupadd --system --gid 10001 pipeline \
    && useradd --system --uid 10001 --gid pipeline --home-dir /var/lib/pipeline \
       --no-create-home --shell /usr/sbin/nologin pipeline \
    && install -d -o pipeline -g pipeline -m 0700 /var/lib/pipeline
COPY --from=build /opt/openuxi-pipeline /opt/openuxi-pipeline
ENV PATH=/opt/openuxi-pipeline/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/pipeline
VOLUME ["/var/lib/pipeline"]
# control WebSocket, HTTP ingest + read API + dashboard + /metrics, UI stream
EXPOSE 8765 8081 8766
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["pipeline-server", "health", "--config", "/config/server.yml"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pipeline-server"]
CMD ["--config", "/config/server.yml"]

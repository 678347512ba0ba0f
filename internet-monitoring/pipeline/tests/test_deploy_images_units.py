"""Static checks of what ships for Docker and systemd: hadolint on the Dockerfiles, the
compose files against the compose-spec schema, ``systemd-analyze verify`` and
``systemd-analyze security --offline=true`` (exposure <= 2.5) on the units. These machines
cannot pull base images, so the images' start commands are run as plain processes in
test_deploy_start.py; here, that they stay what those tests run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from pipeline.tests.conftest import require_tool
from pipeline.tests.deploy_support import DOCKER_DIR, IM_DIR, SYSTEMD_DIR, VENV_BIN, image_commands

DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
COMPOSE_FILES = [IM_DIR / "docker-compose.sensor.pipeline.yml",
                 IM_DIR / "docker-compose.server.pipeline.yml"]
UNITS = sorted(SYSTEMD_DIR.glob("*.service"))
MAX_EXPOSURE = 2.5
_EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def tool(name: str) -> str:
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else require_tool(name)


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd=cwd,
                          check=False)


def test_dockerfiles_pass_hadolint(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    assert [p.name for p in DOCKERFILES] == ["sensor.Dockerfile", "server.Dockerfile"]
    done = run(hadolint, *map(str, DOCKERFILES))
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad.Dockerfile"  # the linter is really looking
    bad.write_text("FROM python:latest\nRUN pip install aiohttp\n")
    assert run(hadolint, str(bad)).returncode != 0


def test_images_are_non_root_with_state_volume_and_healthcheck() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert "\nUSER 10001:10001\n" in text
        assert 'VOLUME ["/var/lib/pipeline"]' in text
        side = "sensor" if dockerfile.name.startswith("sensor") else "server"
        commands = image_commands(dockerfile)
        assert commands.entrypoint == [f"pipeline-{side}"]
        assert commands.healthcheck == [f"pipeline-{side}", "health", "--config",
                                        f"/config/{side}.yml"]
        assert f'".[{side}]"' in text  # sensor image: core dependencies only


def test_sensor_image_unit_and_bench_run_the_agent_with_two_malloc_arenas() -> None:
    """The allocator setting docs/performance.md measured (remote_write section) is the one
    deployments get, in the image and in the unit alike."""
    from bench.remote_write import AGENT_ENV

    setting = "MALLOC_ARENA_MAX=2"
    assert f"{setting}\n" in (DOCKER_DIR / "sensor.Dockerfile").read_text()
    assert f"Environment={setting}\n" in (SYSTEMD_DIR / "pipeline-agent.service").read_text()
    assert AGENT_ENV == {"MALLOC_ARENA_MAX": "2"}


def test_compose_files_match_the_compose_spec(tmp_path: Path) -> None:
    checker = tool("check-jsonschema")
    done = run(checker, "--builtin-schema", "vendor.compose-spec", *map(str, COMPOSE_FILES))
    assert done.returncode == 0, done.stdout + done.stderr
    bad = tmp_path / "bad.yml"  # the schema is really applied
    bad.write_text("services:\n  x:\n    network_mode: 5\n    volumess: []\n")
    assert run(checker, "--builtin-schema", "vendor.compose-spec", str(bad)).returncode != 0


def test_compose_services_as_the_platform_names_them() -> None:
    sensor = yaml.safe_load(COMPOSE_FILES[0].read_text())
    server = yaml.safe_load(COMPOSE_FILES[1].read_text())
    for doc, service, volume, side in (
            (sensor, "pipeline-agent", "pipeline_sensor_data", "sensor"),
            (server, "pipeline-server", "pipeline_server_data", "server")):
        assert list(doc["services"]) == [service]
        spec = doc["services"][service]
        assert spec["network_mode"] == "host"
        assert spec["build"] == {"context": ".", "dockerfile": f"pipeline/docker/{side}.Dockerfile"}
        assert f"{volume}:/var/lib/pipeline" in spec["volumes"]
        assert "./pipeline/config:/config:ro" in spec["volumes"]  # /config/<side>.yml
        assert "./pipeline/tls:/tls:ro" in spec["volumes"]
        assert volume in doc["volumes"]
        # build context is internet-monitoring/ alone: everything the Dockerfile copies is there
        for copied in ("pyproject.toml", "pipeline"):
            assert (IM_DIR / copied).exists()


def units_with_install_paths(tmp_path: Path) -> list[Path]:
    """The shipped units plus the drop-in the Ansible role writes (ExecStart in this venv),
    since verify checks that the ExecStart binary exists."""
    out = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text())
        dropin = tmp_path / f"{unit.name}.d"
        dropin.mkdir()
        program = "pipeline-sensor run" if unit.stem == "pipeline-agent" else "pipeline-server"
        side = "sensor" if unit.stem == "pipeline-agent" else "server"
        (dropin / "openuxi.conf").write_text(
            f"[Service]\nExecStart=\nExecStart={VENV_BIN}/{program} --config /config/{side}.yml\n")
        out.append(copy)
    return out


def test_units_verify_and_rate_at_most_2_5(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    assert [u.name for u in UNITS] == ["pipeline-agent.service", "pipeline-server.service"]
    for unit in units_with_install_paths(tmp_path):
        verified = run(analyze, "verify", str(unit))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        rated = run(analyze, "security", "--offline=true", str(unit))
        match = _EXPOSURE_RE.search(rated.stdout + rated.stderr)
        assert match, rated.stdout[-2000:] + rated.stderr
        assert float(match.group(1)) <= MAX_EXPOSURE, rated.stdout
        text = unit.read_text()
        for setting in ("ProtectSystem=strict", "NoNewPrivileges=yes", "SystemCallFilter=",
                        "StateDirectory=pipeline", "ExecReload=/bin/kill -HUP $MAINPID",
                        "LimitNOFILE="):
            assert setting in text, setting


def test_unit_verify_fails_on_a_broken_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=relative/path\nProtectSystem=sideways\n")
    assert run(analyze, "verify", str(broken)).returncode != 0


def test_synced_folder_overwrites_nothing_of_the_platform() -> None:
    """The platform syncs internet-monitoring/ to its hosts: none of our files may take the
    name of one of its own (prometheus.yml, alert.rules, pipeline-overview.json) or a
    second default Grafana datasource."""
    assert not (IM_DIR / "prometheus" / "prometheus.yml").exists()
    assert not (IM_DIR / "prometheus" / "alert.rules").exists()
    dashboards = IM_DIR / "grafana" / "provisioning" / "dashboards"
    assert not (dashboards / "pipeline-overview.json").exists()
    assert (dashboards / "openuxi-pipeline-delivery.json").exists()
    sources = yaml.safe_load((IM_DIR / "grafana" / "provisioning" / "datasources"
                              / "pipeline-prometheus.yml").read_text())["datasources"]
    assert not any(s.get("isDefault") or s["name"] == "Prometheus" for s in sources)

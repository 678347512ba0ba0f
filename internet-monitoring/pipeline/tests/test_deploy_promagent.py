"""The sensor role adds the pipeline's remote_write entry to the Prometheus agent config
the platform renders (kept as it is otherwise), renders sources.remote_write.listen, and
the result passes ``promtool check config``; switched off, the entry goes again. Run for
real with ansible-core."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.tests.conftest import require_tool
from pipeline.tests.deploy_support import lab_vars, make_lab, run_playbook

#: The platform's promagent config as its template renders it: scrape jobs, external label
#: sensor, the cloud remote_write with queue_config and headers.
PLATFORM_PROMAGENT: dict[str, Any] = {
    "global": {"scrape_interval": "15s", "external_labels": {"sensor": "pi-01"}},
    "scrape_configs": [
        {"job_name": "node", "static_configs": [{"targets": ["localhost:9100"]}]},
        {"job_name": "wifi", "static_configs": [{"targets": ["localhost:9105"]}]}],
    "remote_write": [{"url": "https://cloud.example.com/api/v1/write",
                      "headers": {"X-Scope-OrgID": "uxi"},
                      "queue_config": {"max_samples_per_send": 1000}}],
}


@pytest.mark.slow
def test_sensor_role_adds_the_remote_write_entry_and_promtool_accepts_it(tmp_path: Path
                                                                          ) -> None:
    promtool = require_tool("promtool")
    lab = make_lab(tmp_path)
    promagent = lab.root / "sensor-host" / "internet-monitoring" / "promagent"
    promagent.mkdir(parents=True)
    config = promagent / "prometheus.yml"
    config.write_text(yaml.safe_dump(PLATFORM_PROMAGENT))
    sensor = lab_vars(lab, "sensor", pipeline_sensor_token="t" * 32,
                      pipeline_promagent_reload_command=f"{lab.recorder} promagent reload")

    first = run_playbook(lab, sensor, None)
    assert first.rc == 0, first.output[-4000:]
    assert sorted(lab.take_calls()) == ["promagent reload", "sensor restart"]
    doc = yaml.safe_load(config.read_text())
    assert doc["remote_write"][0] == PLATFORM_PROMAGENT["remote_write"][0]  # kept as is
    assert doc["remote_write"][1]["url"] == "http://127.0.0.1:9201/api/v1/write"
    assert doc["remote_write"][1]["name"] == "openuxi-pipeline"
    assert {k: doc[k] for k in ("global", "scrape_configs")} == {
        k: PLATFORM_PROMAGENT[k] for k in ("global", "scrape_configs")}
    sensor_yml = yaml.safe_load((lab.sensor_dir / "config" / "sensor.yml").read_text())
    assert sensor_yml["sources"] == {"remote_write": {"listen": "127.0.0.1:9201"}}
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    again = run_playbook(lab, sensor, None)  # idempotent: one entry, nothing reloaded
    assert again.rc == 0 and again.changed == 0, again.output[-3000:]
    assert lab.take_calls() == []
    assert len(yaml.safe_load(config.read_text())["remote_write"]) == 2

    # Switched off: the receiver is off and the entry taken out, the platform's kept.
    off = run_playbook(lab, {**sensor, "pipeline_sensor_remote_write_enable": False}, None)
    assert off.rc == 0, off.output[-3000:]
    assert sorted(lab.take_calls()) == ["promagent reload", "sensor restart"]
    sensor_yml = yaml.safe_load((lab.sensor_dir / "config" / "sensor.yml").read_text())
    assert sensor_yml["sources"] == {"remote_write": {"listen": ""}}
    assert yaml.safe_load(config.read_text())["remote_write"] == PLATFORM_PROMAGENT[
        "remote_write"]

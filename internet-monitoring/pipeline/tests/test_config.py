"""Configuration loading: every error names its dotted key; env overrides win over YAML."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.config import (
    SensorConfig,
    ServerConfig,
    load_sensor_config,
    load_server_config,
    sensor_config_from_dict,
    server_config_from_dict,
)
from pipeline.common.errors import ConfigError
from pipeline.version import SOFTWARE_VERSION

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SENSOR_MIN: dict[str, Any] = {"sensor_id": "pi-01", "token": "t0k"}


def server_error(doc: Any, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        server_config_from_dict(doc, env or {})
    return info.value


def sensor_error(doc: Any, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        sensor_config_from_dict(doc, env or {})
    return info.value


def sensor_doc(**extra: Any) -> dict[str, Any]:
    return {**SENSOR_MIN, **extra}


# ---------------------------------------------------------------------------------------
# Examples stay in step with the code


def _missing_keys(cls: Any, docs: list[dict[str, Any]], at: str = "") -> list[str]:
    """Dotted keys of ``cls`` that none of ``docs`` spells out."""
    missing: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{at}.{f.name}" if at else f.name
        present = [d[f.name] for d in docs if f.name in d]
        if not present:
            missing.append(key)
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            missing += _missing_keys(tp, present, key)
        elif get_origin(tp) in (list, tuple) and dataclasses.is_dataclass(get_args(tp)[0]):
            items = [item for seq in present for item in seq]
            missing += _missing_keys(get_args(tp)[0], items, key + "[]")
    return missing


def test_server_example_loads_and_spells_out_every_default() -> None:
    path = EXAMPLES / "server.yml"
    config = load_server_config(path, env={})
    assert _missing_keys(ServerConfig, [yaml.safe_load(path.read_text())]) == []
    assert dataclasses.replace(config, auth=ServerConfig().auth) == ServerConfig()
    assert [s.id for s in config.auth.sensors] == ["pi-01", "pi-02"]
    pi02 = config.auth.sensors[1]
    assert pi02.tokens[0].expires_at() is not None and pi02.tokens[1].expires_at() is None
    # placeholders only: the sha256 entries are hashes of obviously fake tokens
    assert pi02.token_sha256 == hashlib.sha256(b"change-me-pi-02").hexdigest()
    assert all("change-me" in s.token for s in config.auth.sensors if s.token)


def _uncomment_scrape(text: str) -> str:
    """The example with its commented ``sources.scrape`` entry made live."""
    text = text.replace("  scrape: []", "  scrape:")
    return "\n".join(line.replace("  #  ", "    ", 1) if line.startswith("  #  ") else line
                     for line in text.splitlines())


def test_sensor_example_loads_and_spells_out_every_default() -> None:
    path = EXAMPLES / "sensor.yml"
    config = load_sensor_config(path, env={})
    # sources.scrape is empty by default; its keys are spelled out in a commented entry.
    with_scrape = yaml.safe_load(_uncomment_scrape(path.read_text()))
    assert with_scrape["sources"]["scrape"], "the commented scrape entry is gone"
    sensor_config_from_dict(with_scrape)
    assert _missing_keys(SensorConfig, [yaml.safe_load(path.read_text()), with_scrape]) == []
    assert config.token == "change-me-pi-01"  # the example server.yml accepts it for pi-01
    normalised = dataclasses.replace(config, token="", software_version=SOFTWARE_VERSION)
    assert normalised == SensorConfig(sensor_id="pi-01")


# ---------------------------------------------------------------------------------------
# Defaults and types


def test_server_defaults() -> None:
    config = server_config_from_dict({})
    assert (config.control.port, config.ingest.port, config.stream.port) == (8765, 8081, 8766)
    assert config.store.engine == "sqlite" and config.store.synchronous == "FULL"
    assert config.ingest.max_body_bytes == 4 * 1024 * 1024
    assert config.stream.token == "" and config.stream.allowed_origins == ()
    assert config.auth.sensors == ()


def test_sensor_defaults_and_queue_path_from_sensor_id() -> None:
    config = sensor_config_from_dict(sensor_doc(sensor_id="lab.7"))
    assert config.queue.path == "./var/sensor-lab.7.db"
    assert config.software_version == SOFTWARE_VERSION
    assert config.capabilities == ("chunks", "heartbeats", "epoch", "server_time",
                                   "heartbeat_stats", "proto", "batch", "http_ack")
    assert config.queue.max_bytes == 512 * 1024 * 1024
    explicit = sensor_config_from_dict(sensor_doc(queue={"path": "/data/q.db"}))
    assert explicit.queue.path == "/data/q.db"


def test_config_is_frozen() -> None:
    config = server_config_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.control.port = 1  # type: ignore[misc]


def test_int_is_accepted_for_float_and_becomes_float() -> None:
    config = server_config_from_dict({"heartbeat": {"interval_s": 5}})
    assert config.heartbeat.interval_s == 5.0 and isinstance(config.heartbeat.interval_s, float)


@pytest.mark.parametrize("doc, key, expected", [
    ({"control": {"port": True}}, "control.port", "integer"),
    ({"control": {"port": 80.0}}, "control.port", "integer"),
    ({"metrics": {"enabled": "true"}}, "metrics.enabled", "boolean"),
    ({"heartbeat": {"interval_s": False}}, "heartbeat.interval_s", "number"),
    ({"stream": {"token": 123}}, "stream.token", "string"),
    ({"stream": {"allowed_origins": "https://x"}}, "stream.allowed_origins", "list"),
    ({"ingest": {"tls": "on"}}, "ingest.tls", "mapping"),
    ({"auth": {"sensors": {"id": "pi-01"}}}, "auth.sensors", "list"),
])
def test_wrong_type_names_key_and_expected_type(doc: dict[str, Any], key: str,
                                                expected: str) -> None:
    error = server_error(doc)
    assert error.field == key
    assert error.message.startswith(f"{key}: expected {expected}")


def test_non_finite_float_is_refused() -> None:
    assert server_error({"scheduler": {"quiet_s": float("inf")}}).field == "scheduler.quiet_s"
    assert server_error({"scheduler": {"quiet_s": float("nan")}}).field == "scheduler.quiet_s"


def test_wrong_type_in_list_item_names_index() -> None:
    doc = {"auth": {"sensors": [{"id": "pi-01", "token": "a"}, {"id": "pi-02", "token": 123}]}}
    error = server_error(doc)
    assert error.field == "auth.sensors[1].token"
    assert "expected string, got integer" in error.message


def test_list_of_dataclasses_nested() -> None:
    doc = {"auth": {"sensors": [{"id": "pi-01", "tokens": [
        {"token": "old", "not_after": "2027-01-01T00:00:00+00:00"}, {"token_sha256": "a" * 64}]}]}}
    sensor = server_config_from_dict(doc).auth.sensors[0]
    assert [t.token for t in sensor.tokens] == ["old", ""]
    assert sensor.tokens[0].expires_at().year == 2027
    bad = {"auth": {"sensors": [{"id": "pi-01", "tokens": [{"token": "a"}, {"tokn": "b"}]}]}}
    assert server_error(bad).field == "auth.sensors[0].tokens[1].tokn"


def test_optional_accepts_null_and_checks_value() -> None:
    assert sensor_config_from_dict(sensor_doc(queue={"max_bytes": None})).queue.max_bytes is None
    error = sensor_error(sensor_doc(queue={"max_bytes": "big"}))
    assert error.field == "queue.max_bytes" and "integer or null" in error.message
    assert sensor_error(sensor_doc(queue={"max_bytes": 0})).field == "queue.max_bytes"
    assert sensor_error(sensor_doc(queue={"max_bytes": {}})).message.endswith(
        "expected integer or null, got mapping")


def test_dict_of_str() -> None:
    config = sensor_config_from_dict(sensor_doc(control={"headers": {"X-Site": "lab"}}))
    assert config.control.headers == {"X-Site": "lab"}
    error = sensor_error(sensor_doc(control={"headers": {"X-Site": 7}}))
    assert error.field == "control.headers.X-Site"


def test_empty_section_means_defaults() -> None:
    assert server_config_from_dict({"ingest": {"tls": None}}).ingest == ServerConfig().ingest


# ---------------------------------------------------------------------------------------
# Unknown and missing keys


def test_unknown_nested_key_is_named_with_suggestion() -> None:
    error = server_error({"ingest": {"tls": {"certt": "/x.pem"}}})
    assert error.field == "ingest.tls.certt"
    assert error.message.startswith("ingest.tls.certt: unknown key")
    assert "'cert'" in error.message


def test_unknown_top_level_key() -> None:
    assert server_error({"strem": {}}).field == "strem"
    assert sensor_error(sensor_doc(sensorid="x")).field == "sensorid"


def test_missing_sensor_id() -> None:
    error = sensor_error({"token": "x"})
    assert error.field == "sensor_id" and "required" in error.message


def test_sensor_needs_token_or_token_file() -> None:
    error = sensor_error({"sensor_id": "pi-01"})
    assert error.field == "token"
    assert sensor_config_from_dict({"sensor_id": "pi-01", "token_file": "/etc/t"}).token == ""
    env = {"PIPELINE_SENSOR_TOKEN": "from-env"}
    assert sensor_config_from_dict({"sensor_id": "pi-01"}, env).token == "from-env"


def test_bad_sensor_id() -> None:
    assert sensor_error(sensor_doc(sensor_id="bad id!")).field == "sensor_id"


# ---------------------------------------------------------------------------------------
# Value checks


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-(2**20), max_value=2**20))
def test_port_range(port: int) -> None:
    doc = {"stream": {"port": port}}
    if 0 <= port <= 65535:
        assert server_config_from_dict(doc).stream.port == port
    else:
        assert server_error(doc).field == "stream.port"


@pytest.mark.parametrize("section", ["control", "ingest", "stream"])
@pytest.mark.parametrize("missing", ["cert", "key"])
def test_tls_enabled_requires_cert_and_key(section: str, missing: str) -> None:
    tls = {"enabled": True, "cert": "/c.pem", "key": "/k.pem"}
    del tls[missing]
    error = server_error({section: {"tls": tls}})
    assert error.field == f"{section}.tls.{missing}"
    tls[missing] = "/x.pem"
    assert getattr(server_config_from_dict({section: {"tls": tls}}), section).tls.enabled


def test_tls_disabled_needs_nothing() -> None:
    assert not server_config_from_dict({"ingest": {"tls": {"enabled": False}}}).ingest.tls.enabled


@pytest.mark.parametrize("doc, key", [
    ({"store": {"engine": "mysql"}}, "store.engine"),
    ({"store": {"engine": "postgres"}}, "store.dsn"),
    ({"store": {"synchronous": "OFF"}}, "store.synchronous"),
    ({"store": {"retention_hours": 0}}, "store.retention_hours"),
    ({"control": {"path": "control"}}, "control.path"),
    ({"ingest": {"max_body_bytes": 0}}, "ingest.max_body_bytes"),
    ({"ingest": {"bind": ""}}, "ingest.bind"),
    ({"scheduler": {"max_in_flight": 0}}, "scheduler.max_in_flight"),
    ({"scheduler": {"quiet_s": -1}}, "scheduler.quiet_s"),
    ({"heartbeat": {"missed_before_disconnect": 0}}, "heartbeat.missed_before_disconnect"),
    ({"logging": {"level": "LOUD"}}, "logging.level"),
    ({"logging": {"format": "xml"}}, "logging.format"),
    ({"stream": {"allowed_origins": [""]}}, "stream.allowed_origins[0]"),
])
def test_server_value_errors_name_key(doc: dict[str, Any], key: str) -> None:
    assert server_error(doc).field == key


def test_postgres_with_dsn_is_accepted() -> None:
    config = server_config_from_dict({"store": {"engine": "postgres", "dsn": "postgresql://db/p"}})
    assert config.store.engine == "postgres"
    assert "postgresql://db/p" not in repr(config)  # the DSN may hold a password


def test_auth_sensor_errors() -> None:
    def sensors(*entries: dict[str, Any]) -> dict[str, Any]:
        return {"auth": {"sensors": list(entries)}}

    ok = {"id": "pi-01", "token": "a"}
    assert server_error(sensors(ok, {"id": "bad id"})).field == "auth.sensors[1].id"
    assert server_error(sensors({"id": "pi-01"})).field == "auth.sensors[0].token"
    assert server_error(sensors({"token": "a"})).field == "auth.sensors[0].id"
    bad_hash = {"id": "pi-02", "token_sha256": "abc"}
    assert server_error(sensors(ok, bad_hash)).field == "auth.sensors[1].token_sha256"
    no_form = {"id": "pi-02", "tokens": [{"not_after": "2027-01-01T00:00:00Z"}]}
    assert server_error(sensors(no_form)).field == "auth.sensors[0].tokens[0].token"
    for when in ("soon", "2027-01-01T00:00:00"):  # unparsable; no UTC offset
        entry = {"id": "pi-02", "tokens": [{"token": "b", "not_after": when}]}
        assert server_error(sensors(entry)).field == "auth.sensors[0].tokens[0].not_after"


def test_duplicate_sensor_ids_name_the_second() -> None:
    entries = [{"id": f"pi-{i}", "token": "a"} for i in range(3)] + [{"id": "pi-1", "token": "b"}]
    error = server_error({"auth": {"sensors": entries}})
    assert error.field == "auth.sensors[3].id"
    assert "first at auth.sensors[1]" in error.message


def test_tokens_do_not_appear_in_repr() -> None:
    doc = {"stream": {"token": "s3cret-stream"},
           "auth": {"sensors": [{"id": "pi-01", "token": "s3cret-sensor",
                                 "tokens": [{"token": "s3cret-next"}]}]}}
    assert "s3cret" not in repr(server_config_from_dict(doc))
    assert "s3cret" not in repr(sensor_config_from_dict(sensor_doc(token="s3cret")))


@pytest.mark.parametrize("size, ok", [(65535, False), (65536, True), (262144, True),
                                      (262145, False)])
def test_slice_size_bounds(size: int, ok: bool) -> None:
    doc = sensor_doc(queue={"slice_size": size})
    if ok:
        assert sensor_config_from_dict(doc).queue.slice_size == size
    else:
        assert sensor_error(doc).field == "queue.slice_size"


@pytest.mark.parametrize("extra, key", [
    ({"control": {"url": "http://x/control"}}, "control.url"),
    ({"control": {"tls": {"enabled": True}}}, "control.url"),
    ({"ingest": {"url": "ws://x/v1"}}, "ingest.url"),
    ({"ingest": {"url": "https://"}}, "ingest.url"),
    ({"ingest": {"tls": {"enabled": True}}}, "ingest.url"),
    ({"ingest": {"tls": {"cert": "/c.pem"}}}, "ingest.tls.key"),
    ({"control": {"tls": {"key": "/k.pem"}}}, "control.tls.cert"),
    ({"ingest": {"max_parallel": 0}}, "ingest.max_parallel"),
    ({"control": {"ping_timeout": 0}}, "control.ping_timeout"),
    ({"heartbeat_interval": 0}, "heartbeat_interval"),
    ({"backoff": {"initial_s": 2.0, "max_s": 1.0}}, "backoff.max_s"),
    ({"backoff": {"jitter": 1.0}}, "backoff.jitter"),
    ({"time_sync": {"max_skew_ms": -1}}, "time_sync.max_skew_ms"),
    ({"submit": {"listen": "8089"}}, "submit.listen"),
    ({"metrics": {"listen": "host:99999"}}, "metrics.listen"),
    ({"queue": {"synchronous": "full"}}, "queue.synchronous"),
    ({"capabilities": ["chunks", ""]}, "capabilities[1]"),
])
def test_sensor_value_errors_name_key(extra: dict[str, Any], key: str) -> None:
    assert sensor_error(sensor_doc(**extra)).field == key


def test_sensor_tls_and_listen_accepted() -> None:
    config = sensor_config_from_dict(sensor_doc(
        control={"url": "wss://srv:8765/control", "tls": {"enabled": True, "ca_cert": "/ca"}},
        ingest={"url": "https://srv/v1/ingest/chunk", "tls": {"enabled": True}},
        submit={"listen": "127.0.0.1:8089"}, metrics={"listen": "[::1]:9101"}))
    assert config.control.tls.enabled and config.ingest.tls.enabled
    assert config.metrics.listen == "[::1]:9101"


# ---------------------------------------------------------------------------------------
# Environment overrides


def test_env_override_wins_over_yaml() -> None:
    doc = {"stream": {"token": "from-yaml"}}
    env = {"PIPELINE_SERVER__STREAM__TOKEN": "from-env"}
    assert server_config_from_dict(doc, env).stream.token == "from-env"


def test_generic_env_beats_convenience_which_beats_yaml() -> None:
    doc = {"stream": {"token": "yaml"}}
    assert server_config_from_dict(doc, {"PIPELINE_STREAM_TOKEN": "conv"}).stream.token == "conv"
    both = {"PIPELINE_STREAM_TOKEN": "conv", "PIPELINE_SERVER__STREAM__TOKEN": "generic"}
    assert server_config_from_dict(doc, both).stream.token == "generic"
    sensor_env = {"PIPELINE_SENSOR_TOKEN": "conv", "PIPELINE_SENSOR__TOKEN": "generic"}
    assert sensor_config_from_dict(sensor_doc(), sensor_env).token == "generic"


def test_env_text_stays_verbatim_other_values_parse_as_yaml() -> None:
    env = {"PIPELINE_SERVER__STREAM__TOKEN": "0123",
           "PIPELINE_SERVER__CONTROL__PORT": "9000",
           "PIPELINE_SERVER__METRICS__ENABLED": "false",
           "PIPELINE_SERVER__STORE__ENGINE": "postgres",
           "PIPELINE_SERVER__STORE__DSN": "postgresql://db/p",
           "PIPELINE_SERVER__STREAM__ALLOWED_ORIGINS": "[https://a, https://b]"}
    config = server_config_from_dict({}, env)
    assert config.stream.token == "0123"
    assert config.control.port == 9000
    assert config.metrics.enabled is False
    assert config.store.engine == "postgres"
    assert config.stream.allowed_origins == ("https://a", "https://b")
    sensor = sensor_config_from_dict(sensor_doc(), {"PIPELINE_SENSOR__QUEUE__MAX_BYTES": "null"})
    assert sensor.queue.max_bytes is None


def test_env_override_bad_value_names_key_and_variable() -> None:
    error = server_error({}, {"PIPELINE_SERVER__CONTROL__PORT": "abc"})
    assert error.field == "control.port"
    assert "PIPELINE_SERVER__CONTROL__PORT" in error.message
    error = server_error({}, {"PIPELINE_SERVER__CONTROL__PORT": "70000"})
    assert error.field == "control.port" and "PIPELINE_SERVER__CONTROL__PORT" in error.message
    error = server_error({}, {"PIPELINE_SERVER__SCHEDULER__MAX_CHUNKS": "[unclosed"})
    assert error.field == "scheduler.max_chunks"


def test_env_override_does_not_echo_secret_values() -> None:
    error = server_error({}, {"PIPELINE_SERVER__METRICS__ENABLED": "hunter2-secret"})
    assert error.field == "metrics.enabled" and "hunter2" not in error.message


def test_env_unknown_key_is_named() -> None:
    error = server_error({}, {"PIPELINE_SERVER__STREAM__TOKN": "x"})
    assert error.field == "stream.tokn" and "PIPELINE_SERVER__STREAM__TOKN" in error.message
    error = server_error({}, {"PIPELINE_SERVER__STREAM____TOKEN": "x"})
    assert error.field == "stream" and "empty key segment" in error.message


def test_env_cannot_reach_inside_scalar() -> None:
    error = server_error({}, {"PIPELINE_SERVER__CONTROL__PORT__X": "1"})
    assert error.field == "control.port"


def test_env_list_item_override() -> None:
    doc = {"auth": {"sensors": [{"id": "pi-01", "token": "yaml"}]}}
    env = {"PIPELINE_SERVER__AUTH__SENSORS__0__TOKEN": "env"}
    assert server_config_from_dict(doc, env).auth.sensors[0].token == "env"
    error = server_error(doc, {"PIPELINE_SERVER__AUTH__SENSORS__1__TOKEN": "env"})
    assert error.field == "auth.sensors[1]"


def test_env_override_creates_missing_sections() -> None:
    env = {"PIPELINE_SERVER__INGEST__TLS__ENABLED": "true",
           "PIPELINE_SERVER__INGEST__TLS__CERT": "/c.pem"}
    error = server_error({}, env)
    assert error.field == "ingest.tls.key"  # the YAML never mentioned ingest at all
    env["PIPELINE_SERVER__INGEST__TLS__KEY"] = "/k.pem"
    assert server_config_from_dict({}, env).ingest.tls.cert == "/c.pem"


def test_unrelated_env_is_ignored_and_caller_doc_untouched() -> None:
    doc = {"stream": {"token": "yaml"}}
    env = {"PIPELINE_SERVER_THING": "x", "PIPELINE_SENSOR__TOKEN": "y", "HOME": "/root",
           "PIPELINE_SERVER__STREAM__TOKEN": "env"}
    assert server_config_from_dict(doc, env).stream.token == "env"
    assert doc == {"stream": {"token": "yaml"}}


# ---------------------------------------------------------------------------------------
# Files


def test_load_from_file_with_env(tmp_path: Path) -> None:
    path = tmp_path / "sensor.yml"
    path.write_text("sensor_id: pi-09\nqueue:\n  retention_hours: 24\n")
    config = load_sensor_config(path, env={"PIPELINE_SENSOR_TOKEN": "t"})
    assert (config.sensor_id, config.queue.retention_hours, config.token) == ("pi-09", 24, "t")
    assert load_server_config(None, env={}) == ServerConfig()


def test_unquoted_timestamp_in_yaml_stays_text(tmp_path: Path) -> None:
    path = tmp_path / "server.yml"
    path.write_text("auth:\n  sensors:\n    - id: pi-01\n      tokens:\n"
                    "        - token: a\n          not_after: 2027-01-01T00:00:00Z\n")
    token = load_server_config(path, env={}).auth.sensors[0].tokens[0]
    assert token.not_after == "2027-01-01T00:00:00Z"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_non_mapping_document(tmp_path: Path, text: str) -> None:
    path = tmp_path / "server.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="top level"):
        load_server_config(path, env={})


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "server.yml"
    path.write_text("# nothing set\n")
    assert load_server_config(path, env={}) == ServerConfig()


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_server_config(tmp_path / "missing.yml", env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_server_config(tmp_path, env={})  # a directory
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read"):
        load_server_config(binary, env={})
    broken = tmp_path / "broken.yml"
    broken.write_text("control:\n  port: [1, 2\n  token: s3cret\n")
    with pytest.raises(ConfigError, match="line") as info:
        load_server_config(broken, env={})
    assert "s3cret" not in info.value.message


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server.yml"
    path.write_text("control:\n  port: 1\n  port: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'port'"):
        load_server_config(path, env={})

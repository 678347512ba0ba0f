"""Sans-I/O security cores: certificate identities, throttling, the rotation overlay,
credential revocation checks, the sensor's token rotation and atomic file writes.

(The Hypothesis fuzz of the control-envelope and chunk decoders lives in test_messages.py
and test_proto_codec.py; it is not repeated here.)"""

from __future__ import annotations

import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.config import server_config_from_dict
from pipeline.common.errors import ConfigError, Forbidden
from pipeline.common.files import atomic_write_text
from pipeline.common.messages import Command
from pipeline.sensor.credentials import apply_rotation
from pipeline.server.security.auth import Credential, TokenAuthenticator, hash_token
from pipeline.server.security.credentials import PRUNE_AFTER_S, CredentialOverlay, overlay_path
from pipeline.server.security.identity import (
    IdentityPolicy,
    bind_all,
    bind_identity,
    certificate_identities,
)
from pipeline.server.security.manager import build_authenticator
from pipeline.server.security.throttle import (
    AuthFailureBans,
    ConnectionLimiter,
    RateLimiter,
    TokenBucket,
)

NOW = 1_800_000_000.0


def cert(*sans: tuple[str, str], cn: str | None = None) -> dict:
    doc: dict = {"subject": ((("organizationName", "x"),),)}
    if cn is not None:
        doc["subject"] += ((("commonName", cn),),)
    if sans:
        doc["subjectAltName"] = tuple(sans)
    return doc


# ---------------------------------------------------------------------------------------
# identity.py


@pytest.mark.parametrize("peercert,policy,expected", [
    (cert(("URI", "urn:openuxi:sensor:pi-01")), IdentityPolicy(), {"pi-01"}),
    (cert(("URI", "spiffe://fleet.example/sensor/pi-02")), IdentityPolicy(), {"pi-02"}),
    (cert(("URI", "spiffe://fleet.example/other/pi-02")), IdentityPolicy(), set()),
    (cert(("URI", "spiffe://fleet.example/sensor/pi-02/x")), IdentityPolicy(), set()),
    (cert(("URI", "https://example.com/pi-01")), IdentityPolicy(), set()),
    (cert(("URI", "urn:openuxi:sensor:../etc")), IdentityPolicy(), set()),
    (cert(("DNS", "pi-01")), IdentityPolicy(), {"pi-01"}),
    (cert(("DNS", "pi-01.sensors.example")), IdentityPolicy(), {"pi-01.sensors.example"}),
    (cert(("DNS", "pi-01.sensors.example")), IdentityPolicy(".sensors.example"), {"pi-01"}),
    (cert(("DNS", "PI-01.Sensors.Example")), IdentityPolicy(".sensors.example"), {"PI-01"}),
    (cert(("DNS", "pi-01.evil.example")), IdentityPolicy(".sensors.example"), set()),
    (cert(("DNS", ".sensors.example")), IdentityPolicy(".sensors.example"), set()),
    (cert(("DNS", "*.sensors.example")), IdentityPolicy(), set()),
    (cert(("IP Address", "10.0.0.1")), IdentityPolicy(), set()),
    (cert(cn="pi-07"), IdentityPolicy(), set()),                         # CN: opt-in only
    (cert(cn="pi-07"), IdentityPolicy(cn_fallback=True), {"pi-07"}),
    (cert(("DNS", "pi-01"), cn="pi-07"), IdentityPolicy(cn_fallback=True), {"pi-01"}),
    (cert(("URI", "urn:openuxi:sensor:a"), ("DNS", "b")), IdentityPolicy(), {"a", "b"}),
    (None, IdentityPolicy(), set()),
    ({}, IdentityPolicy(), set()),
])
def test_certificate_identities(peercert, policy, expected):
    assert certificate_identities(peercert, policy) == expected


def test_a_dotted_name_is_one_identity_not_a_prefix_family():
    ids = certificate_identities(cert(("DNS", "a.b.c")))
    assert ids == {"a.b.c"}
    with pytest.raises(Forbidden):
        bind_identity("a", cert(("DNS", "a.b.c")))


def test_bind_identity_refuses_without_naming_what_the_certificate_holds():
    with pytest.raises(Forbidden) as info:
        bind_identity("pi-02", cert(("DNS", "pi-01")))
    assert info.value.http_status == 403 and info.value.close_code == 1008
    assert "pi-01" not in info.value.message
    with pytest.raises(Forbidden, match="required"):
        bind_identity("pi-01", None)
    assert bind_identity("pi-01", cert(("DNS", "pi-01"))) == "pi-01"
    with pytest.raises(Forbidden):
        bind_all(["pi-01", "pi-02"], cert(("DNS", "pi-01")))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["DNS", "URI", "IP Address", "email"]),
                          st.text(max_size=40)), max_size=5),
       st.one_of(st.none(), st.text(max_size=40)), st.booleans(), st.text(max_size=12))
def test_identities_are_always_valid_sensor_ids(sans, cn, fallback, suffix):
    from pipeline.common.messages import SENSOR_ID_RE
    ids = certificate_identities(cert(*sans, cn=cn), IdentityPolicy(suffix, fallback))
    assert all(SENSOR_ID_RE.fullmatch(i) for i in ids)


# ---------------------------------------------------------------------------------------
# throttle.py


def test_token_bucket_refills_at_rate_and_caps_at_burst():
    bucket = TokenBucket.full(rate=10.0, burst=5.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    wait = bucket.take(0.0)
    assert wait == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0            # exactly one token back after 1/rate
    bucket.take(100.0, 0)                      # a long pause refills only to burst
    assert bucket.tokens == pytest.approx(5.0)
    assert bucket.take(100.0, 50) == 0.0       # n above burst counts as burst
    assert bucket.take(99.0) > 0               # a clock going back refills nothing


def test_rate_limiter_is_per_key_and_can_be_off():
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.acquire("a", 0.0) == 0.0 and limiter.acquire("a", 0.0) == 0.0
    assert limiter.acquire("a", 0.0) == pytest.approx(1.0)
    assert limiter.acquire("b", 0.0) == 0.0    # another identity is untouched
    limiter.reconfigure(rate=100.0, burst=1)
    assert limiter.acquire("a", 0.02) == 0.0
    off = RateLimiter(rate=0, burst=1)
    assert all(off.acquire("x", 0.0) == 0.0 for _ in range(1000)) and len(off) == 0


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for key in "abcdef":
        limiter.acquire(key, 0.0)
    assert len(limiter) == 3


def test_auth_failures_ban_an_address_for_a_while():
    bans = AuthFailureBans(max_failures=3, window_s=10.0, ban_s=60.0)
    assert not bans.record_failure("1.2.3.4", 0.0)
    assert not bans.record_failure("1.2.3.4", 1.0)
    assert bans.banned_for("1.2.3.4", 1.0) == 0.0
    assert bans.record_failure("1.2.3.4", 2.0)          # the third one bans
    assert bans.banned_for("1.2.3.4", 3.0) == pytest.approx(59.0)
    assert not bans.record_failure("1.2.3.4", 3.0)      # already banned: not a new ban
    assert bans.banned_for("5.6.7.8", 3.0) == 0.0
    assert bans.banned_for("1.2.3.4", 62.0) == 0.0      # the ban ends
    assert bans.failures("1.2.3.4", 62.0) == 0


def test_failures_outside_the_window_do_not_add_up():
    bans = AuthFailureBans(max_failures=3, window_s=10.0, ban_s=60.0)
    for t in (0.0, 11.0, 22.0, 33.0):
        assert not bans.record_failure("a", t)
    assert bans.banned_for("a", 33.0) == 0.0
    assert not AuthFailureBans(0, 10.0, 60.0).record_failure("a", 0.0)  # off


def test_connection_limiter_counts_per_address():
    limiter = ConnectionLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a")
    assert not limiter.acquire("a")
    assert limiter.acquire("b")
    limiter.release("a")
    assert limiter.acquire("a") and limiter.count("a") == 2 and limiter.total() == 3
    for _ in range(5):
        limiter.release("b")
    assert limiter.count("b") == 0
    assert all(ConnectionLimiter(0).acquire("z") for _ in range(100))


# ---------------------------------------------------------------------------------------
# auth.py additions and the rotation overlay


def base_config(tmp_path, **auth):
    return server_config_from_dict({
        "store": {"path": str(tmp_path / "s.db")},
        "auth": {"sensors": [{"id": "pi-01", "token": "tok-a"},
                             {"id": "pi-02", "tokens": [{"token": "tok-b"}]}], **auth}})


def test_still_valid_follows_expiry_ownership_and_fleet_rules():
    auth = TokenAuthenticator([Credential("pi-01", hash_token("a"), NOW + 10)],
                              fleet_token_sha256=hash_token("fleet"))
    assert auth.still_valid("pi-01", hash_token("a"), NOW)
    assert not auth.still_valid("pi-01", hash_token("a"), NOW + 11)
    assert not auth.still_valid("pi-02", hash_token("a"), NOW)
    assert auth.still_valid("lab-9", hash_token("fleet"), NOW)
    assert not auth.still_valid("pi-01", hash_token("fleet"), NOW)  # has own credentials
    assert not auth.still_valid("pi-01", None, NOW)
    assert auth.identify("a", NOW) == "pi-01" and auth.identify("fleet", NOW) is None


def test_replace_with_swaps_in_place():
    auth = TokenAuthenticator([Credential("pi-01", hash_token("a"))])
    holder = auth
    auth.replace_with(TokenAuthenticator([Credential("pi-02", hash_token("b"))]))
    assert holder.sensor_ids == {"pi-02"} and holder.identify("b", NOW) == "pi-02"


def test_overlay_adds_tokens_and_only_shortens_configured_ones(tmp_path):
    config = base_config(tmp_path)
    overlay = CredentialOverlay(overlay_path(config))
    assert overlay.path == tmp_path / "credentials.json"
    overlay.add("pi-01", hash_token("new"), None, NOW)
    overlay.cap("pi-01", hash_token("tok-a"), NOW + 100, NOW)
    overlay.cap("pi-01", hash_token("tok-a"), NOW + 500, NOW)   # never lengthened
    overlay.add("ghost", hash_token("g"), None, NOW)             # not configured: ignored
    auth = build_authenticator(config, overlay)
    assert auth.authenticate("pi-01", "new", NOW + 1000) == "pi-01"
    assert auth.authenticate("pi-01", "tok-a", NOW + 99) == "pi-01"
    assert not auth.still_valid("pi-01", hash_token("tok-a"), NOW + 101)
    assert "ghost" not in auth.sensor_ids
    assert auth.authenticate("pi-02", "tok-b", NOW + 10**6) == "pi-02"


def test_overlay_round_trips_atomically_with_owner_only_permissions(tmp_path):
    path = tmp_path / "sub" / "creds.json"
    overlay = CredentialOverlay(path)
    overlay.add("pi-01", hash_token("x"), NOW + 5, NOW)
    overlay.save()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["creds.json"]  # no temp left behind
    doc = json.loads(path.read_text())
    assert doc["entries"][0]["token_sha256"] == hash_token("x")  # a digest, not the token
    loaded = CredentialOverlay.load(path)
    assert loaded.entries == overlay.entries
    assert CredentialOverlay.load(tmp_path / "missing.json").entries == {}


@pytest.mark.parametrize("content", ["{", "[]", '{"version": 2, "entries": []}',
                                     '{"version": 1, "entries": [{"sensor_id": "pi 01"}]}',
                                     ('{"version": 1, "entries": [{"sensor_id": "pi-01", '
                                     '"token_sha256": "zz"}]}')])
def test_a_broken_overlay_is_a_config_error(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        CredentialOverlay.load(path)


def test_prune_never_resurrects_a_configured_token(tmp_path):
    config = base_config(tmp_path)
    overlay = CredentialOverlay(tmp_path / "c.json")
    overlay.cap("pi-01", hash_token("tok-a"), NOW, NOW)          # rotated out long ago
    overlay.add("pi-01", hash_token("old-rotated"), NOW, NOW)    # overlay-only, expired
    overlay.add("pi-01", hash_token("current"), None, NOW)
    from pipeline.server.security.auth import credentials_from_entries
    removed = overlay.prune(credentials_from_entries(config.auth.sensors),
                            NOW + PRUNE_AFTER_S + 1)
    assert removed == 1
    auth = build_authenticator(config, overlay)
    assert not auth.still_valid("pi-01", hash_token("tok-a"), NOW + PRUNE_AFTER_S + 2)
    assert auth.still_valid("pi-01", hash_token("current"), NOW + PRUNE_AFTER_S + 2)


# ---------------------------------------------------------------------------------------
# sensor/credentials.py and common/files.py


def rotate_command(token: str) -> Command:
    return Command(command_id="c-1", name="rotate_token",
                   args={"token": token, "not_after": "", "previous_not_after": "x"})


def test_apply_rotation_writes_the_token_file_atomically(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("old-token-0123456789\n")
    token = "oux_" + "A" * 43
    reply = apply_rotation(rotate_command(token), str(token_file))
    assert reply.success and reply.command_id == "c-1"
    assert token not in reply.message
    assert token_file.read_text() == token + "\n"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


@pytest.mark.parametrize("token", ["", "short", "has space in it 0123456789",
                                   "line\nbreak-0123456789", "x" * 600])
def test_apply_rotation_refuses_bad_tokens_and_keeps_the_old_file(tmp_path, token):
    token_file = tmp_path / "token"
    token_file.write_text("old-token-0123456789\n")
    reply = apply_rotation(rotate_command(token), str(token_file))
    assert not reply.success
    assert token_file.read_text() == "old-token-0123456789\n"


def test_apply_rotation_needs_a_token_file_and_reports_write_errors(tmp_path):
    assert not apply_rotation(rotate_command("oux_" + "B" * 43), None).success
    reply = apply_rotation(rotate_command("oux_" + "B" * 43),
                           str(tmp_path / "missing-dir" / "token"))
    assert not reply.success and "cannot write" in reply.message


def test_atomic_write_replaces_whole_content(tmp_path):
    path = tmp_path / "f"
    atomic_write_text(path, "a" * 10_000)
    atomic_write_text(path, "b")
    assert path.read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_the_agent_announces_rotation_only_with_a_token_file(tmp_path, caplog):
    from pipeline.common.config import sensor_config_from_dict
    from pipeline.sensor.capabilities import effective_capabilities

    doc = {"sensor_id": "pi-01", "capabilities": ["chunks", "heartbeats", "rotation"]}
    with_file = sensor_config_from_dict({**doc, "token_file": str(tmp_path / "t")})
    without = sensor_config_from_dict({**doc, "token": "tok-0123456789abcdef"})
    assert "rotation" in effective_capabilities(with_file)
    assert "rotation" not in effective_capabilities(without)
    assert "reason=no_token_file" in caplog.text


def test_admin_client_finds_the_local_ingest_listener():
    from pipeline.server.security.admin_client import ingest_base_url, rotate_url

    plain = server_config_from_dict({"ingest": {"bind": "0.0.0.0", "port": 9000}})
    assert ingest_base_url(plain) == "http://127.0.0.1:9000"
    tls = server_config_from_dict({"ingest": {"bind": "::1", "port": 9443, "tls": {
        "enabled": True, "cert": "c.pem", "key": "k.pem"}}})
    assert ingest_base_url(tls) == "https://[::1]:9443"
    assert rotate_url("http://h:1/", "pi:01") == "http://h:1/v1/sensors/pi%3A01/rotate"

"""TokenAuthenticator (sans-I/O): who may act as which sensor."""

from __future__ import annotations

import base64
import hashlib
import logging

import pytest

from pipeline.common.config import server_config_from_dict
from pipeline.common.errors import ConfigError, Forbidden, Unauthenticated
from pipeline.server.security.auth import (
    TokenAuthenticator,
    bearer_token,
    check_bearer,
    hash_token,
    mint_token,
)

NOW = 1_800_000_000.0


def authenticator() -> TokenAuthenticator:
    config = server_config_from_dict({"auth": {"sensors": [
        {"id": "pi-01", "token": "tok-a"},
        {"id": "pi-02", "token_sha256": hashlib.sha256(b"tok-b").hexdigest()},
        {"id": "pi-03", "tokens": [
            {"token": "tok-old", "not_after": "2027-01-01T00:00:00Z"},
            {"token": "tok-new"}]},
    ]}})
    return TokenAuthenticator.from_config(config)


def test_own_tokens_authenticate_in_every_configured_form():
    auth = authenticator()
    assert auth.authenticate("pi-01", "tok-a", NOW) == "pi-01"
    assert auth.authenticate("pi-02", "tok-b", NOW) == "pi-02"
    assert auth.authenticate("pi-03", "tok-new", NOW) == "pi-03"
    assert auth.authenticate(None, "tok-b", NOW) == "pi-02"  # owner lookup
    assert auth.sensor_ids == {"pi-01", "pi-02", "pi-03"}


@pytest.mark.parametrize("token", [None, "", "nope", "tok-a "])
def test_missing_or_unknown_token_is_unauthenticated(token):
    with pytest.raises(Unauthenticated) as info:
        authenticator().authenticate("pi-01", token, NOW)
    assert info.value.http_status == 401 and info.value.close_code == 1008


def test_another_sensors_token_is_forbidden():
    with pytest.raises(Forbidden) as info:
        authenticator().authenticate("pi-01", "tok-b", NOW)
    assert info.value.http_status == 403


def test_not_after_is_honoured():
    auth = authenticator()
    before = 1_798_761_599.0  # 2026-12-31T23:59:59Z
    assert auth.authenticate("pi-03", "tok-old", before) == "pi-03"
    with pytest.raises(Unauthenticated, match="expired"):
        auth.authenticate("pi-03", "tok-old", before + 2)
    assert auth.authenticate("pi-03", "tok-new", before + 2) == "pi-03"


def test_fleet_token_accepts_any_well_formed_id_without_own_credentials():
    config = server_config_from_dict({"auth": {"fleet_token": "fleet-x",
                                               "sensors": [{"id": "pi-01", "token": "tok-a"}]}})
    auth = TokenAuthenticator.from_config(config)
    assert auth.authenticate("lab-7", "fleet-x", NOW) == "lab-7"
    auth.check("fleet-x", NOW)
    with pytest.raises(Forbidden):
        auth.authenticate("pi-01", "fleet-x", NOW)  # cannot impersonate a configured sensor
    with pytest.raises(Unauthenticated):
        auth.authenticate("bad id!", "fleet-x", NOW)
    with pytest.raises(Unauthenticated):
        auth.authenticate(None, "fleet-x", NOW)  # the fleet token names nobody


def test_fleet_token_by_hash():
    config = server_config_from_dict(
        {"auth": {"fleet_token_sha256": hash_token("fleet-y").upper()}})
    auth = TokenAuthenticator.from_config(config)
    assert auth.authenticate("s-1", "fleet-y", NOW) == "s-1"
    with pytest.raises(Unauthenticated):
        auth.authenticate("s-1", "fleet-z", NOW)


def test_check_refuses_strangers_before_any_sensor_id_is_known():
    auth = authenticator()
    auth.check("tok-a", NOW)
    with pytest.raises(Unauthenticated):
        auth.check("stranger", NOW)
    with pytest.raises(Unauthenticated):
        auth.check(None, NOW)


def test_only_digests_are_kept_and_tokens_never_logged(caplog):
    auth = authenticator()
    kept = repr(vars(auth))
    assert "tok-a" not in kept and "tok-new" not in kept
    with caplog.at_level(logging.DEBUG, logger="pipeline.server.security.auth"):
        for token in ("tok-b", "secret-guess"):
            with pytest.raises((Unauthenticated, Forbidden)):
                auth.authenticate("pi-01", token, NOW)
    assert caplog.records, "refusals are logged"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "tok-b" not in text and "secret-guess" not in text


def test_the_same_token_for_two_sensors_is_a_config_error():
    config = server_config_from_dict({"auth": {"sensors": [{"id": "a", "token": "same"},
                                                           {"id": "b", "token": "same"}]}})
    with pytest.raises(ConfigError):
        TokenAuthenticator.from_config(config)


def test_minted_tokens_are_prefixed_random_base64url():
    first, second = mint_token(), mint_token()
    assert first != second and first.startswith("oux_")
    raw = base64.urlsafe_b64decode(first[4:] + "=")
    assert len(raw) == 32
    demo = mint_token("oux_demo_")
    assert demo.startswith("oux_demo_") and "=" not in demo


def test_bearer_parsing_and_shared_token_check():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    digest = hash_token("stream-1")
    assert check_bearer(digest, "stream-1")
    assert not check_bearer(digest, "stream-2")
    assert not check_bearer(digest, None)

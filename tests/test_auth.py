"""Authentication in plain Python: API keys, the key file, JWTs, the service credential."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway_service.auth import AuthConfigError, Authenticator, AuthSettings, JwtSettings
from gateway_service.keys import (
    INVALID_KEY,
    ApiKey,
    KeyFile,
    KeyFileError,
    hash_token,
    load_key_file,
    new_key,
    parse_env,
)
from runtime_service.trust import ServiceCredential, TrustConfigError
from stopline.authn import bearer_token
from stopline.errors import Unauthenticated

SECRET = "an-hs256-secret-of-at-least-32-bytes!!"
ISSUER = "https://issuer.example"
AUDIENCE = "stopline-gateway"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def refused(check: Any, metadata: Any) -> str:
    with pytest.raises(Unauthenticated) as err:
        check(metadata)
    return str(err.value)


@pytest.fixture
def alice() -> tuple[str, ApiKey]:
    return new_key("alice")


def test_new_key_round_trips_and_only_its_hash_is_stored(alice: tuple[str, ApiKey]) -> None:
    token, key = alice
    assert token.startswith("stl_") and key.sha256 == hash_token(token)
    assert token not in key.toml() and token not in key.env_entry()
    auth = Authenticator.from_settings(AuthSettings(keys=(key,)))
    assert auth.check(bearer(token)) == "alice"
    assert auth.check([("Authorization", f"bearer {token}")]) == "alice"  # case-insensitive


def test_missing_malformed_wrong_and_revoked_keys_are_refused(alice: tuple[str, ApiKey]) -> None:
    token, key = alice
    other_token, other = new_key("alice")  # a principal may hold several keys
    revoked = ApiKey(other.key_id, other.principal, other.sha256, revoked=True)
    auth = Authenticator.from_settings(AuthSettings(keys=(key, revoked)))
    assert "missing credentials" in refused(auth.check, [])
    assert "Bearer <token>" in refused(auth.check, [("authorization", token)])
    assert "exactly one" in refused(auth.check, [*bearer(token), *bearer(token)])
    wrong_secret = token[: token.rindex("_") + 1] + "x" * 43
    unknown_id = "stl_00000000_" + "x" * 43
    # Wrong secret, unknown id and revoked key: one message, naming no key or principal.
    assert refused(auth.check, bearer(wrong_secret)) == INVALID_KEY
    assert refused(auth.check, bearer(unknown_id)) == INVALID_KEY
    assert refused(auth.check, bearer(other_token)) == INVALID_KEY
    assert "accepts no JWTs" in refused(auth.check, bearer("eyJhbGciOi.x.y"))


def test_no_credentials_configured_refuses_to_build() -> None:
    with pytest.raises(AuthConfigError, match="no credentials configured"):
        Authenticator.from_settings(AuthSettings())
    _, key = new_key("alice")
    only_revoked = ApiKey(key.key_id, key.principal, key.sha256, revoked=True)
    with pytest.raises(AuthConfigError):
        Authenticator.from_settings(AuthSettings(keys=(only_revoked,)))


def test_key_file_toml_and_json_and_revocation_without_restart(tmp_path: Path) -> None:
    token, key = new_key("alice")
    second_token, second = new_key("alice")
    toml = tmp_path / "keys.toml"
    toml.write_text(key.toml() + "\n" + second.toml())
    ring = KeyFile(toml, recheck_seconds=0)
    assert ring.principal(token) == ring.principal(second_token) == "alice"
    # Revoke one key; the other keeps working, with no restart.
    toml.write_text(key.toml() + "revoked = true\n\n" + second.toml() + "\n")
    os.utime(toml, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    with pytest.raises(Unauthenticated):
        ring.principal(token)
    assert ring.principal(second_token) == "alice"
    # A broken edit keeps the previous keys (and logs).
    toml.write_text("[[keys]\n")
    os.utime(toml, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert ring.principal(second_token) == "alice"

    as_json = tmp_path / "keys.json"
    entry = {"id": key.key_id, "principal": "alice", "sha256": key.sha256}
    as_json.write_text(json.dumps({"keys": [entry]}))
    assert load_key_file(as_json) == [key]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"id": "a b", "principal": "p", "sha256": "0" * 64}, "id must be"),
        ({"id": "a", "principal": "", "sha256": "0" * 64}, "principal must be"),
        ({"id": "a", "principal": "p", "sha256": "abc"}, "sha256 must be"),
        ({"id": "a", "principal": "p", "sha256": "0" * 64, "revoked": "yes"}, "revoked"),
    ],
)
def test_bad_key_file_entries_name_the_problem(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [entry]}))
    with pytest.raises(KeyFileError, match=problem):
        load_key_file(path)


def test_keys_from_the_environment_format(alice: tuple[str, ApiKey]) -> None:
    _, key = alice
    _, bob = new_key("bob")
    assert parse_env(f"{key.env_entry()}, {bob.env_entry()}") == [key, bob]
    with pytest.raises(KeyFileError):
        parse_env("just-a-hash")


# ---------------------------------------------------------------------------------- JWTs


def jwt_auth(**overrides: Any) -> Authenticator:
    settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "hs256_secret": SECRET}
    settings.update(overrides)
    return Authenticator.from_settings(AuthSettings(jwt=JwtSettings(**settings)))


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "carol",
        "iat": now,
        "exp": now + 300,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def hs256_by_hand(payload: dict[str, Any], secret: bytes) -> str:
    """PyJWT refuses to sign HS256 with a PEM key, as an attacker's own code would not."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(payload).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def test_a_valid_hs256_jwt_names_its_subject() -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert jwt_auth().check(bearer(token)) == "carol"


@pytest.mark.parametrize(
    ("token_claims", "key", "message"),
    [
        (claims(exp=int(time.time()) - 3600), SECRET, "expired"),
        (claims(iss="https://evil.example"), SECRET, "issuer"),
        (claims(aud="someone-else"), SECRET, "audience"),
        (claims(), "another-secret-that-is-32-bytes-long!", "signature"),
        (claims(sub=None), SECRET, "'sub'"),
        (claims(exp=None), SECRET, "'exp'"),
    ],
    ids=["expired", "wrong-issuer", "wrong-audience", "bad-signature", "no-sub", "no-exp"],
)
def test_bad_jwts_are_refused_saying_why(
    token_claims: dict[str, Any], key: str, message: str
) -> None:
    token = jwt.encode(token_claims, key, algorithm="HS256")
    assert message in refused(jwt_auth().check, bearer(token))


def test_garbage_and_unsigned_tokens_are_refused() -> None:
    assert "well-formed JWT" in refused(jwt_auth().check, bearer("not-a-token"))
    unsigned = jwt.encode(claims(), "", algorithm="none")
    assert "accepts HS256" in refused(jwt_auth().check, bearer(unsigned))


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_jwts_and_no_algorithm_confusion(tmp_path: Path, algorithm: str) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pub"
    key_file.write_bytes(public_pem)
    auth = jwt_auth(hs256_secret=None, public_key_file=str(key_file))
    assert auth.check(bearer(jwt.encode(claims(), private, algorithm=algorithm))) == "carol"
    # An attacker who signs HS256 with the (public) key as the HMAC secret gets nowhere.
    forged = hs256_by_hand(claims(), public_pem)
    assert "accepts" in refused(auth.check, bearer(forged))


def test_jwt_settings_are_checked_at_start() -> None:
    with pytest.raises(AuthConfigError, match="issuer and an audience"):
        jwt_auth(issuer="")
    with pytest.raises(AuthConfigError, match="32 bytes"):
        jwt_auth(hs256_secret="short")


# ------------------------------------------------------------------------ service credential


def test_service_credential_accepts_any_configured_token_and_nothing_else() -> None:
    old, new = "old-service-token-0123456789", "new-service-token-0123456789"
    check = ServiceCredential([old, new]).check
    assert check(bearer(old)) == check(bearer(new)) == "service"
    assert "wrong" in refused(check, bearer("not-the-service-token-000"))
    assert "STOPLINE_SERVICE_TOKEN" in refused(check, [])
    with pytest.raises(TrustConfigError):
        ServiceCredential(["short"])
    with pytest.raises(TrustConfigError):
        ServiceCredential([])


def test_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"Bearer abc")]) == "abc"
    with pytest.raises(Unauthenticated):
        bearer_token([("authorization", "Basic abc")])
    with pytest.raises(Unauthenticated):
        bearer_token([("authorization", "Bearer ")])

"""Who is calling the gateway: API keys (gateway_service.keys) and, when configured, signed JWTs.

A caller sends `authorization: Bearer <token>`. A token in Stopline's API key format (`stl_…`) is
checked against the key file or STOPLINE_API_KEYS; any other token is verified as a JWT when JWTs
are configured (signature, `exp`, `iss`, `aud`; the principal is `sub`). Every refusal is
UNAUTHENTICATED with a message that says what to fix, never which keys or principals exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jwt

from gateway_service.keys import (
    API_KEYS_ENV,
    INVALID_KEY,
    MAX_PRINCIPAL,
    ApiKey,
    KeyFile,
    KeyFileError,
    KeyRing,
    key_id_of,
    parse_env,
)
from stopline.authn import AuthInterceptor, Metadata, bearer_token
from stopline.errors import Unauthenticated

HMAC_ALGORITHMS = ("HS256",)
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")


class AuthConfigError(ValueError):
    """Authentication is configured in a way the gateway cannot start with."""


@dataclass(frozen=True)
class JwtSettings:
    issuer: str
    audience: str
    hs256_secret: str | None = None
    public_key_file: str | None = None
    # Clock skew tolerated on exp/nbf/iat, in seconds.
    leeway_seconds: float = 30.0


@dataclass(frozen=True)
class AuthSettings:
    key_file: str | None = None
    keys: tuple[ApiKey, ...] = ()
    jwt: JwtSettings | None = None

    @classmethod
    def from_environment(
        cls, key_file: str | None, jwt_settings: JwtSettings | None
    ) -> AuthSettings:
        env = os.environ.get(API_KEYS_ENV, "")
        try:
            keys = tuple(parse_env(env)) if env.strip() else ()
        except KeyFileError as exc:
            raise AuthConfigError(str(exc)) from exc
        return cls(key_file=key_file, keys=keys, jwt=jwt_settings)


class JwtVerifier:
    def __init__(self, settings: JwtSettings) -> None:
        if not settings.issuer or not settings.audience:
            raise AuthConfigError("JWTs need both an issuer and an audience to check")
        if not settings.hs256_secret and not settings.public_key_file:
            raise AuthConfigError("JWTs need an HS256 secret or a public key file to verify with")
        if settings.hs256_secret is not None and len(settings.hs256_secret.encode()) < 32:
            raise AuthConfigError("the HS256 secret must be at least 32 bytes")
        self._settings = settings
        self._keys: dict[str, str] = {}
        if settings.hs256_secret:
            self._keys.update(dict.fromkeys(HMAC_ALGORITHMS, settings.hs256_secret))
        if settings.public_key_file:
            try:
                pem = Path(settings.public_key_file).read_text()
            except OSError as exc:
                raise AuthConfigError(
                    f"cannot read JWT public key {settings.public_key_file}: {exc.strerror}"
                ) from exc
            self._keys.update(dict.fromkeys(PUBLIC_KEY_ALGORITHMS, pem))

    def principal(self, token: str) -> str:
        s = self._settings
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise Unauthenticated(
                "the token is neither a Stopline API key nor a well-formed JWT"
            ) from exc
        # The key is chosen by algorithm, never the other way round: an HS256 token cannot be
        # "verified" with the public key as its secret (algorithm confusion).
        key = self._keys.get(str(alg))
        if key is None:
            accepted = ", ".join(sorted(self._keys))
            raise Unauthenticated(f"the JWT is signed with {alg}; this gateway accepts {accepted}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(alg)],
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the JWT has expired; get a fresh token") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthenticated("the JWT's issuer (iss) is not accepted by this gateway") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthenticated("the JWT's audience (aud) does not name this gateway") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated("the JWT's signature does not verify") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the JWT lacks the required claim '{exc.claim}'") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated("the JWT is not valid yet (nbf/iat in the future)") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("the JWT cannot be verified; check how it is signed") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > MAX_PRINCIPAL:
            raise Unauthenticated(
                f"the JWT's subject (sub) must be 1 to {MAX_PRINCIPAL} characters: the principal"
            )
        return subject


# The kinds of refusal the gateway's metrics count (stopline_gateway_auth_failures_total).
REFUSED_NO_CREDENTIALS = "no_credentials"  # no, several, or a malformed authorization entry
REFUSED_API_KEY = "api_key"  # an API key (stl_...) this gateway does not have
REFUSED_JWT_NOT_ACCEPTED = "jwt_not_accepted"  # not an API key, and no JWTs are configured
REFUSED_JWT_EXPIRED = "jwt_expired"
REFUSED_JWT_INVALID = "jwt_invalid"  # any other JWT problem (signature, issuer, audience, ...)
REFUSAL_KINDS = (
    REFUSED_NO_CREDENTIALS,
    REFUSED_API_KEY,
    REFUSED_JWT_NOT_ACCEPTED,
    REFUSED_JWT_EXPIRED,
    REFUSED_JWT_INVALID,
)


@dataclass
class Authenticator:
    """Turns a call's metadata into its principal; see the module docstring."""

    rings: Sequence[KeyRing] = field(default_factory=list)
    jwt: JwtVerifier | None = None
    # Told the kind of each refusal (one of REFUSAL_KINDS): the gateway's metrics.
    on_refused: Callable[[str], None] | None = None

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> Authenticator:
        rings: list[KeyRing] = []
        try:
            if settings.key_file:
                rings.append(KeyFile(settings.key_file))
        except KeyFileError as exc:
            raise AuthConfigError(str(exc)) from exc
        if settings.keys:
            rings.append(KeyRing(settings.keys))
        verifier = JwtVerifier(settings.jwt) if settings.jwt is not None else None
        if verifier is None and not any(r.usable for r in rings):
            raise AuthConfigError(
                "no credentials configured: give --api-keys-file (or STOPLINE_API_KEYS) with at "
                "least one key (create one with `stopline gateway new-key --principal NAME`), "
                "or configure JWTs (--jwt-issuer, --jwt-audience and a key)"
            )
        return cls(rings, verifier)

    def check(self, metadata: Metadata) -> str:
        try:
            token = bearer_token(metadata)
        except Unauthenticated:
            self._refused(REFUSED_NO_CREDENTIALS)
            raise
        try:
            return self._principal(token)
        except Unauthenticated as exc:
            self._refused(self._refusal_kind(token, exc))
            raise

    def _refused(self, kind: str) -> None:
        if self.on_refused is not None:
            self.on_refused(kind)

    def _refusal_kind(self, token: str, exc: Unauthenticated) -> str:
        if key_id_of(token) is not None:
            return REFUSED_API_KEY
        if self.jwt is None:
            return REFUSED_JWT_NOT_ACCEPTED
        if isinstance(exc.__cause__, jwt.ExpiredSignatureError):
            return REFUSED_JWT_EXPIRED
        return REFUSED_JWT_INVALID

    def _principal(self, token: str) -> str:
        if key_id_of(token) is not None:
            for ring in self.rings:
                try:
                    return ring.principal(token)
                except Unauthenticated:
                    continue
            raise Unauthenticated(INVALID_KEY)
        if self.jwt is None:
            raise Unauthenticated(
                "the token is not a Stopline API key (stl_…), and this gateway accepts no JWTs"
            )
        return self.jwt.principal(token)

    def interceptor(self) -> AuthInterceptor:
        return AuthInterceptor(self.check, "gateway authentication")

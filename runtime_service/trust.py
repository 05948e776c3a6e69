"""Which callers the runtime serves: those holding the shared service credential, and/or those
presenting a client certificate signed by the configured CA (mutual TLS, enforced by the TLS
handshake itself, before any of this code runs).

The runtime trusts its callers completely (they set owners, stop anything), so only the gateways
and operators' tools may reach it. The principal of a trusted call is "service".
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from stopline.authn import AuthInterceptor, Metadata, bearer_token
from stopline.errors import Unauthenticated

SERVICE_PRINCIPAL = "service"
MIN_TOKEN_LENGTH = 16


class TrustConfigError(ValueError):
    """The runtime would serve anybody: it refuses to start (see --insecure-allow-any-caller)."""


def _digest(token: str) -> bytes:
    # Compared as fixed-length digests, so the comparison time says nothing about the length.
    return hashlib.sha256(token.encode()).digest()


class ServiceCredential:
    """Accepts any of `tokens` (several: rotate without downtime by accepting old and new)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        given = list(tokens)
        self._digests = [_digest(t) for t in given]
        for token in given:
            if len(token) < MIN_TOKEN_LENGTH:
                raise TrustConfigError(
                    f"a service token must be at least {MIN_TOKEN_LENGTH} characters"
                )
        if not self._digests:
            raise TrustConfigError("no service token given")

    def check(self, metadata: Metadata) -> str:
        try:
            token = bearer_token(metadata)
        except Unauthenticated as exc:
            raise Unauthenticated(
                f"{exc}; the runtime serves only trusted services: send the service credential "
                "(STOPLINE_SERVICE_TOKEN) as a bearer token"
            ) from None
        given = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise Unauthenticated(
                "the service credential is wrong; use the token the runtime was configured with"
            )
        return SERVICE_PRINCIPAL

    def interceptor(self) -> AuthInterceptor:
        return AuthInterceptor(self.check, "runtime service credential")

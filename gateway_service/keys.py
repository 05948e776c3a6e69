"""API keys: generation, hashing, the key file, and lookup by token.

A token is `stl_<key id>_<secret>`: the key id says which entry to compare against (so a lookup
is one dict access and one constant-time comparison, whatever the number of keys), and the
secret is 32 random bytes, so storing only sha256(token) is safe (no salt or slow hash is needed
for a high-entropy secret). The gateway never stores or logs a token.

The key file (TOML or JSON, same shape) lists entries; a principal may have several keys, and
each is revoked on its own by `revoked = true` or by deleting its entry:

    [[keys]]
    id = "3f9a0c1b"
    principal = "alice"
    sha256 = "<64 hex digits>"
    # revoked = true

The file is re-read when it changes (checked at most once a second), so revoking or adding a key
needs no restart. A file that no longer parses keeps the previous keys and logs an error.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stopline.errors import Unauthenticated
from stopline.limits import MAX_OWNER

log = logging.getLogger(__name__)

PREFIX = "stl_"
API_KEYS_ENV = "STOPLINE_API_KEYS"
"""Keys without a file: `principal:key_id:sha256` entries separated by commas or spaces."""
# A principal becomes the owner of the operations it starts, so it must fit the owner's limit.
MAX_PRINCIPAL = MAX_OWNER
_KEY_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
INVALID_KEY = "invalid API key: it is unknown or revoked; ask your operator for a valid key"


class KeyFileError(ValueError):
    """The key configuration cannot be used; the message names the entry and the problem."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    principal: str
    sha256: str
    revoked: bool = False

    def toml(self) -> str:
        return (
            f'[[keys]]\nid = "{self.key_id}"\nprincipal = {json.dumps(self.principal)}\n'
            f'sha256 = "{self.sha256}"\n'
        )

    def env_entry(self) -> str:
        return f"{self.principal}:{self.key_id}:{self.sha256}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key(principal: str) -> tuple[str, ApiKey]:
    """A fresh token (show it once) and the entry to store (only its hash)."""
    check_principal(principal)
    key_id = secrets.token_hex(4)
    token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return token, ApiKey(key_id, principal, hash_token(token))


def check_principal(principal: str) -> str:
    if not principal or len(principal) > MAX_PRINCIPAL or not principal.isprintable():
        raise KeyFileError(f"principal must be 1 to {MAX_PRINCIPAL} printable characters")
    return principal


def key_id_of(token: str) -> str | None:
    """The key id of a token in Stopline's format, else None."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    return key_id if sep and secret and _KEY_ID.match(key_id) else None


def parse_entries(entries: Iterable[Mapping[str, Any]], source: str) -> list[ApiKey]:
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for n, entry in enumerate(entries, 1):
        where = f"{source}: key #{n}"
        if not isinstance(entry, Mapping):
            raise KeyFileError(f"{where}: must be a table with id, principal and sha256")
        key_id, principal, digest = entry.get("id"), entry.get("principal"), entry.get("sha256")
        revoked = entry.get("revoked", False)
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            raise KeyFileError(f"{where}: id must be 1 to 64 letters, digits or '-'")
        if not isinstance(principal, str):
            raise KeyFileError(f"{where}: principal must be a string")
        try:
            check_principal(principal)
        except KeyFileError as exc:
            raise KeyFileError(f"{where}: {exc}") from None
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            raise KeyFileError(f"{where}: sha256 must be 64 hex digits (see gateway new-key)")
        if not isinstance(revoked, bool):
            raise KeyFileError(f"{where}: revoked must be true or false")
        if key_id in seen:
            raise KeyFileError(f"{where}: id {key_id!r} appears twice")
        seen.add(key_id)
        keys.append(ApiKey(key_id, principal, digest.lower(), revoked))
    return keys


def load_key_file(path: str | os.PathLike[str]) -> list[ApiKey]:
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {file}: {exc.strerror}") from exc
    try:
        data: Any = (
            json.loads(raw) if file.suffix.lower() == ".json" else tomllib.loads(raw.decode())
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"key file {file} is not valid TOML/JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise KeyFileError(f"key file {file}: expected a list named 'keys'")
    return parse_entries(data.get("keys", []), str(file))


def parse_env(value: str) -> list[ApiKey]:
    entries = []
    for item in re.split(r"[,\s]+", value.strip()):
        if not item:
            continue
        principal, _, rest = item.rpartition(":")
        principal, _, key_id = principal.rpartition(":") if principal else ("", "", "")
        if not principal:
            raise KeyFileError(f"{API_KEYS_ENV}: entries are principal:key_id:sha256")
        entries.append({"id": key_id, "principal": principal, "sha256": rest})
    return parse_entries(entries, API_KEYS_ENV)


class KeyRing:
    """Looks a token up among fixed keys (from the environment, or handed in by a test)."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_id = {k.key_id: k for k in keys}

    @property
    def usable(self) -> int:
        return sum(not k.revoked for k in self._by_id.values())

    def principal(self, token: str) -> str:
        key_id = key_id_of(token)
        key = self._by_id.get(key_id) if key_id else None
        # Hash even when there is no such key, so timing does not tell which ids exist.
        digest = hash_token(token)
        expected = key.sha256 if key is not None else "0" * 64
        if not hmac.compare_digest(digest, expected) or key is None or key.revoked:
            raise Unauthenticated(INVALID_KEY)
        return key.principal


class KeyFile(KeyRing):
    """A KeyRing that follows its file: changes apply within `recheck_seconds`."""

    def __init__(self, path: str | os.PathLike[str], recheck_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self._recheck = recheck_seconds
        self._lock = threading.Lock()
        self._stamp = self._stat()
        super().__init__(load_key_file(self.path))
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def refresh(self) -> None:
        """Reload if the file changed; keep the old keys (and log) if the new file is broken."""
        with self._lock:
            self._checked = time.monotonic()
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                keys = load_key_file(self.path)
            except KeyFileError as exc:
                log.error("key file changed but cannot be used; keeping the previous keys: %s", exc)
                return
            self._by_id = {k.key_id: k for k in keys}
            log.info("key file reloaded: %d usable keys", self.usable)

    def principal(self, token: str) -> str:
        if time.monotonic() - self._checked >= self._recheck:
            self.refresh()
        return super().principal(token)

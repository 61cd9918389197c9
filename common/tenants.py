"""API keys and the tenants they stand for.

EMBEDQ_API_KEYS (comma-separated) and EMBEDQ_API_KEYS_FILE (one a line; blank lines and `#`
comments are skipped) hold `key` entries, which all act for the one shared tenant (named ""), and
`name:key` entries, which act for tenant `name`: its collections and jobs are its own. A tenant
named in EMBEDQ_ADMIN_KEYS sees every tenant's. With no key at all the API is open, and every
caller is an admin. A key list that would leave the API open by mistake, or that names a key
twice, is refused when the process starts.

A session token (the console's sign-in cookie, api.routes.console) stands for a key until it
expires: `<expiry>.<HMAC-SHA256 of the expiry, keyed by the key>`. Every API process can check it
against the keys it has, so no process keeps a secret of its own, and the key itself is never
stored in the browser. Removing a key ends its sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from .settings import Settings

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SHARED = ""


class KeyConfigError(ValueError):
    """The key settings are unusable; the message says which entry and why."""


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False

    def owns(self, tenant: str) -> bool:
        """Whether this caller may see what `tenant` owns."""
        return self.admin or tenant == self.tenant

    @property
    def scope(self) -> str | None:
        """The tenant a listing or a direct task is limited to; None: every tenant's."""
        return None if self.admin else self.tenant


OPEN = Principal(SHARED, admin=True)


def _file_entries(settings: Settings) -> list[str]:
    if settings.api_keys_file is None:
        return []
    path = settings.api_keys_file
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise KeyConfigError(f"EMBEDQ_API_KEYS_FILE {path} cannot be read: {exc.strerror}") from None
    entries = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise KeyConfigError(f"EMBEDQ_API_KEYS_FILE {path} holds no key (one `key` or `name:key` a line)")
    return entries


def _parse(entry: str, where: str) -> tuple[str, str]:
    name, colon, key = entry.partition(":")
    if not colon:
        return SHARED, entry
    if not NAME.fullmatch(name):
        raise KeyConfigError(f"{where}: tenant name {name!r} must match {NAME.pattern}")
    if not key.strip():
        raise KeyConfigError(f"{where}: tenant {name!r} has an empty key")
    return name, key.strip()


class KeyRing:
    """Every configured key with the principal it stands for."""

    def __init__(self, entries: list[tuple[bytes, Principal]]):
        self._entries = entries

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        parsed = [_parse(e, f"EMBEDQ_API_KEYS entry {i + 1}") for i, e in enumerate(settings.api_keys)]
        parsed += [_parse(e, f"EMBEDQ_API_KEYS_FILE line {i + 1}") for i, e in enumerate(_file_entries(settings))]
        keys = [key for _, key in parsed]
        if len(set(keys)) != len(keys):
            raise KeyConfigError("a key is listed twice: each key must stand for one tenant")
        names = {name for name, _ in parsed if name != SHARED}
        unknown = sorted(set(settings.admin_keys) - names)
        if unknown:
            raise KeyConfigError(f"EMBEDQ_ADMIN_KEYS names {unknown}, which no `name:key` entry defines")
        admins = set(settings.admin_keys)
        return cls([(key.encode(), Principal(name, admin=name in admins)) for name, key in parsed])

    @property
    def open(self) -> bool:
        return not self._entries

    def principal(self, authorization: str) -> Principal | None:
        """Who `Authorization: Bearer <key>` is; None for a missing or unknown key."""
        if self.open:
            return OPEN
        found = self._entry(authorization)
        return found[1] if found else None

    def _entry(self, authorization: str) -> tuple[bytes, Principal] | None:
        scheme, _, given = authorization.partition(" ")
        given_bytes = given.strip().encode()
        found = None
        # Compare against every key without stopping early, so timing reveals nothing.
        for entry in self._entries:
            if hmac.compare_digest(given_bytes, entry[0]):
                found = entry
        return found if scheme.lower() == "bearer" else None

    def session_token(self, authorization: str, ttl_s: int) -> str | None:
        """A token standing for the key of `Authorization: Bearer <key>` for `ttl_s`; None for an unknown key."""
        found = self._entry(authorization)
        if found is None:
            return None
        expires = int(time.time()) + ttl_s
        return f"{expires}.{_sign(found[0], expires)}"

    def session(self, token: str) -> Principal | None:
        """Who a session token stands for; None when it is unknown or has expired."""
        if self.open:
            return OPEN
        expiry, _, signature = token.partition(".")
        if not expiry.isdigit() or int(expiry) < time.time():
            return None
        found = None
        for key, principal in self._entries:
            if hmac.compare_digest(signature.encode(), _sign(key, int(expiry)).encode()):
                found = principal
        return found


def _sign(key: bytes, expires: int) -> str:
    return hmac.new(key, f"embedq-session:{expires}".encode(), hashlib.sha256).hexdigest()

"""API keys and the tenants they stand for.

EMBEDQ_API_KEYS (comma-separated) and EMBEDQ_API_KEYS_FILE (one a line; blank lines and `#`
comments are skipped) hold `key` entries, which all act for the one shared tenant (named ""), and
`name:key` entries, which act for tenant `name`: its collections and jobs are its own. A tenant
named in EMBEDQ_ADMIN_KEYS sees every tenant's. With no key at all the API is open, and every
caller is an admin. A key list that would leave the API open by mistake, or that names a key
twice, is refused when the process starts.
"""

from __future__ import annotations

import hmac
import re
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
        scheme, _, given = authorization.partition(" ")
        given_bytes = given.strip().encode()
        found = None
        # Compare against every key without stopping early, so timing reveals nothing.
        for key, principal in self._entries:
            if hmac.compare_digest(given_bytes, key):
                found = principal
        return found if scheme.lower() == "bearer" else None

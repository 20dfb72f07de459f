"""Tenants: who owns a dataset, checkpoint, job or model, and who may see it. Torch-free, no I/O.

``LDD_API_KEYS=team-a:KEY1,team-b:KEY2`` names the tenant of each key; a key without a name is its own tenant
(named after a hash of the key, so the key itself is never written to the store). ``LDD_ADMIN_KEYS`` (same
form) see every tenant's resources. Without any key the service is open and single-tenant: every caller is
the :data:`DEFAULT_TENANT` and sees everything, which is also the tenant of the rows made before tenants
existed (migration 0002).

A caller's *scope* is the tenant whose rows it may see, or ``None`` for all of them (an admin, the open
service, the worker). Another tenant's row is reported exactly as a missing one, so ids do not leak.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant that owns what it creates, and whether it sees every tenant."""

    tenant: str = DEFAULT_TENANT
    admin: bool = False

    @property
    def scope(self) -> str | None:
        """The tenant whose rows this caller sees; None: all."""
        return None if self.admin else self.tenant


OPEN = Caller(DEFAULT_TENANT, admin=True)  # no keys configured: one tenant, which sees everything


def key_tenant(entry: str) -> tuple[str, str]:
    """``"name:key"`` -> (name, key); a bare ``"key"`` -> (``key-<12 hex of its sha256>``, key).

    Raises ValueError for a name that is not ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (at most 64) or an empty key.
    """
    name, sep, key = entry.partition(":")
    if not sep:
        key = entry
        name = "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    if not key:
        raise ValueError(f"API key entry {entry!r} has no key after its tenant name")
    if not TENANT_NAME.match(name):
        raise ValueError(f"tenant name {name!r}: letters, digits, '_', '.', '-' (at most 64), a letter or digit first")
    return name, key


def parse_keys(api_keys: list[str], admin_keys: list[str]) -> dict[str, Caller]:
    """The callers of the configured keys, by key. Empty: the service is open."""
    callers: dict[str, Caller] = {}
    for entries, admin in ((api_keys, False), (admin_keys, True)):
        for entry in entries:
            name, key = key_tenant(entry)
            callers[key] = Caller(name, admin)
    return callers


def visible(row: dict[str, Any] | None, scope: str | None) -> bool:
    """Whether a store row exists for a caller of ``scope`` (rows without a tenant are the default's)."""
    if row is None:
        return False
    return scope is None or row.get("tenant", DEFAULT_TENANT) == scope

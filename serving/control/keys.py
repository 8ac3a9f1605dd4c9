"""API keys: random, shown once, stored only as a hash, resolved to a tenant on every request.

A key reads `frg_<key_id>_<secret>`: the key id is its public half (listings, logs, the ledger), the secret 32
random bytes. Only sha256(key) is stored; with 256 bits of entropy a fast hash is enough (a slow password hash
protects guessable secrets, and these are not). Lookups compare in constant time and are cached for
`key_cache_s`, so a revoked key stops working within that time on every replica.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa

from serving.control.errors import InvalidApiKey
from serving.control.store import api_keys

KEY_PREFIX = "frg"
ROLES = ("user", "admin")


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str  # public identifier
    tenant: str  # who the key's requests belong to
    role: str  # user | admin (admin keys may act for another tenant)
    models: tuple[str, ...] | None  # allowlist; None: every model
    private: bool  # the key's data never leaves self-hosted routes
    rpm: int | None  # requests per minute
    tpm: int | None  # tokens per minute
    created_at: float  # UNIX seconds
    revoked_at: float | None  # UNIX seconds, or None while valid


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_id(key: str) -> str | None:
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]


def _row_to_key(row) -> ApiKey:
    models = tuple(m for m in row.models.split(",") if m) if row.models else None
    return ApiKey(row.key_id, row.tenant, row.role, models, bool(row.private), row.rpm, row.tpm, row.created_at,
                  row.revoked_at)


class KeyStore:
    def __init__(self, engine: sa.Engine, cache_s: float = 2.0):
        self.engine = engine
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, ApiKey | None, str]] = {}  # key_id -> (checked at, key, hash)
        self._lock = threading.Lock()

    def create(self, tenant: str, role: str = "user", models: list[str] | None = None, private: bool = False,
               rpm: int | None = None, tpm: int | None = None) -> tuple[str, ApiKey]:
        """A new key for `tenant`; returns (the key, shown once, and its record)."""
        if not tenant or "," in tenant:
            raise ValueError(f"tenant must be a non-empty name without commas, got {tenant!r}")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        for name, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32).replace('_', '-')}"
        record = ApiKey(key_id, tenant, role, tuple(models) if models else None, private, rpm, tpm, time.time(), None)
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(
                key_id=key_id, key_hash=_hash(key), tenant=tenant, role=role,
                models=",".join(models) if models else None, private=private, rpm=rpm, tpm=tpm,
                created_at=record.created_at, revoked_at=None))
        return key, record

    def list(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(api_keys.select().order_by(api_keys.c.created_at)).fetchall()
        return [_row_to_key(r) for r in rows]

    def revoke(self, key_id: str) -> ApiKey:
        """Revokes a key (again: no change); raises KeyError for an unknown id."""
        with self.engine.begin() as conn:
            conn.execute(api_keys.update().where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=time.time()))
            row = conn.execute(api_keys.select().where(api_keys.c.key_id == key_id)).fetchone()
        with self._lock:
            self._cache.pop(key_id, None)
        if row is None:
            raise KeyError(f"no API key with id {key_id!r}")
        return _row_to_key(row)

    def is_cached(self, key: str | None) -> bool:
        """Whether `authenticate(key)` can answer without the database (the event loop may call it then)."""
        key_id = _key_id(key) if key else None
        with self._lock:
            cached = self._cache.get(key_id) if key_id else None
        return key_id is None or (cached is not None and time.monotonic() - cached[0] <= self.cache_s)

    def authenticate(self, key: str | None) -> ApiKey:
        """The valid key record for `key`; raises InvalidApiKey (never naming the key) otherwise."""
        if not key:
            raise InvalidApiKey("missing API key: send Authorization: Bearer <key>")
        key_id = _key_id(key)
        if key_id is None:
            raise InvalidApiKey("invalid API key")
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is None or now - cached[0] > self.cache_s:
            with self.engine.connect() as conn:
                row = conn.execute(api_keys.select().where(api_keys.c.key_id == key_id)).fetchone()
            cached = (now, _row_to_key(row) if row is not None else None, row.key_hash if row is not None else "")
            with self._lock:
                self._cache[key_id] = cached
        _, record, key_hash = cached
        if record is None or not hmac.compare_digest(key_hash, _hash(key)):
            raise InvalidApiKey("invalid API key")
        if record.revoked_at is not None:
            raise InvalidApiKey(f"API key {record.key_id} has been revoked")
        return record

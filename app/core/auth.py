"""API keys: `coft_<40 hex>`, one or more per tenant, stored as sha256.

A plain sha256 (not bcrypt/argon2) is enough because keys are 160 random bits, not passwords: no
dictionary to try, and the lookup by hash stays one indexed query per request.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import session_factory
from app.core.models import ApiKey, Tenant

KEY_PREFIX = "coft_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_hex(20)


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, key: str | None = None) -> str:
    """Add a key for the tenant (created if new); returns the key, which is never stored."""
    key = key or generate_key()
    if len(key) < 16:
        raise ValueError("API keys must be at least 16 characters")
    tenant = get_or_create_tenant(session, tenant_name)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    return key


def ensure_key(session: Session, tenant_name: str, key: str) -> None:
    """Idempotent create_key for COFT_BOOTSTRAP_API_KEY: every start of every process may call it."""
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if existing is None:
        create_key(session, tenant_name, key)


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return None if api_key is None else session.get(Tenant, api_key.tenant_id)


class KnownKeys:
    """Which tenant each key belongs to, remembered for `ttl_s` seconds: the hot routes (predict,
    uploads) look their key up on every request, and a known key's tenant does not change. Unknown
    keys are never remembered, so a key created a moment ago works at once."""

    def __init__(self, database_url: str, ttl_s: float, max_keys: int = 10_000):
        self.database_url, self.ttl_s, self.max_keys = database_url, ttl_s, max_keys
        self._known: dict[str, tuple[Tenant, float]] = {}  # key hash -> (tenant, valid until)
        self._lock = threading.Lock()

    def tenant(self, key: str) -> Tenant | None:
        digest, now = hash_key(key), time.monotonic()
        known = self._known.get(digest)
        if known is not None and known[1] > now:
            return known[0]
        with session_factory(self.database_url)() as session:  # closed on the way out; the tenant
            tenant = tenant_for_key(session, key)  # stays readable, detached: only its columns are used
        if tenant is not None and self.ttl_s > 0:
            with self._lock:
                if len(self._known) >= self.max_keys:
                    self._known.clear()
                self._known[digest] = (tenant, now + self.ttl_s)
        return tenant

"""The gate in front of the routes that carry files (uploads and predictions).

Those bodies can be large, so who is asking, and whether they are over their rate limit, is settled
from the headers alone, before a byte of the body is read: an unknown key or a tenant over its
limit costs the server one indexed query, not a spooled 2 GB upload (a known key, not even that:
`KnownKeys` remembers it for COFT_API_KEY_CACHE_S). The routes still depend on
`current_tenant` as every other route does; the gate only answers earlier.

Rate limits are per tenant and per kind of request ("uploads", "predict"), counted with the
`limits` package in a moving window: in Redis when REDIS_URL is set, so every API process shares
the count, else in this process. When Redis cannot be reached the gate lets requests through
(and logs it): losing the limiter must not take the API down with it.
"""

from __future__ import annotations

import logging
import math
import re
import time

from limits import parse_many, storage, strategies

from app.api.deps import run_blocking
from app.core.auth import KnownKeys
from app.api.errors import problem_response
from app.core.settings import Settings

log = logging.getLogger("app.gate")

LIMITER_TIMEOUT_S = 2.0

# (method, path pattern) -> the rate-limit bucket that request draws from.
GATED_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/v1/datasets/?$"), "uploads"),
    ("POST", re.compile(r"^/v1/datasets/[^/]+/parts/?$"), "uploads"),
    ("POST", re.compile(r"^/v1/classifiers/[^/]+/predict/?$"), "predict"),
    ("POST", re.compile(r"^/v1/zero-shot/predict/?$"), "predict"),
]


def bucket_for(method: str, path: str) -> str | None:
    for route_method, pattern, bucket in GATED_ROUTES:
        if method == route_method and pattern.match(path):
            return bucket
    return None


class RateLimits:
    """Per-tenant limits for each bucket, as configured in Settings (`rate_limit_<bucket>`)."""

    def __init__(self, settings: Settings):
        self.rules = {"uploads": parse_many(settings.rate_limit_uploads),
                      "predict": parse_many(settings.rate_limit_predict)}
        # A Redis that hangs must not hang the request: after the timeout it is let through (below).
        backend = (storage.storage_from_string(settings.redis_url, socket_timeout=LIMITER_TIMEOUT_S,
                                               socket_connect_timeout=LIMITER_TIMEOUT_S)
                   if settings.redis_url else storage.storage_from_string("memory://"))
        self.limiter = strategies.MovingWindowRateLimiter(backend)

    def retry_after_s(self, bucket: str, tenant_id: str) -> int | None:
        """Count one request; None if it is allowed, else the seconds until it would be."""
        for rule in self.rules[bucket]:
            if not self.limiter.hit(rule, bucket, tenant_id):
                reset_at = self.limiter.get_window_stats(rule, bucket, tenant_id).reset_time
                return max(1, math.ceil(reset_at - time.time()))
        return None


def _bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return (key.strip() or None) if scheme.lower() == "bearer" else None
    return None


class FileRouteGate:
    """Pure ASGI: 401 or 429 for gated routes before the body is read; everything else passes."""

    def __init__(self, app, settings: Settings, rate_limits: RateLimits):
        self.app, self.settings, self.rate_limits = app, settings, rate_limits
        self.keys = KnownKeys(settings.database_url, settings.api_key_cache_s)

    async def __call__(self, scope, receive, send) -> None:
        bucket = bucket_for(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if bucket is None:
            return await self.app(scope, receive, send)
        # Blocking work (a DB query, a Redis round trip) runs in a thread, as FastAPI does for sync routes.
        tenant, response = await run_blocking(self._check, bucket, _bearer_key(scope["headers"]), scope["path"])
        if response is not None:
            return await response(scope, receive, send)
        scope.setdefault("state", {})["tenant"] = tenant  # the route's current_tenant need not look it up again
        await self.app(scope, receive, send)

    def _check(self, bucket: str, key: str | None, path: str):
        """(tenant, None) when the request may go on, else (None, the refusal)."""
        if key is None:
            return None, problem_response(401, "unauthorized", "Unauthorized",
                                          "send an API key as `Authorization: Bearer KEY`", path,
                                          {"WWW-Authenticate": "Bearer"})
        tenant = self.keys.tenant(key)
        if tenant is None:
            return None, problem_response(401, "unauthorized", "Unauthorized", "unknown API key", path,
                                          {"WWW-Authenticate": "Bearer"})
        try:
            retry_after = self.rate_limits.retry_after_s(bucket, tenant.id)
        except Exception:  # noqa: BLE001 - the limiter's store is down: serve rather than fail
            log.warning("rate limiter unavailable; request allowed", exc_info=True)
            return tenant, None
        if retry_after is None:
            return tenant, None
        return None, problem_response(429, "rate-limited", "Too many requests",
                                      f"over this tenant's {bucket} rate limit; retry in {retry_after} s", path,
                                      {"Retry-After": str(retry_after)}, retry_after_s=retry_after)

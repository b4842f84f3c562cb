"""Worker presence in Redis: each worker's main process refreshes a key with a TTL; /readyz reads them.

Cheaper and more predictable than `celery inspect ping`, which broadcasts and waits for replies.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from app.core.settings import Settings

KEY_PREFIX = "coft:worker:"


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.broker_url, socket_timeout=2, socket_connect_timeout=2)


def announce(client: redis.Redis, hostname: str, info: dict[str, Any], ttl_s: float) -> None:
    client.set(KEY_PREFIX + hostname, json.dumps(info), px=int(ttl_s * 1000))


def live_workers(settings: Settings) -> dict[str, dict[str, Any]]:
    client = redis_client(settings)
    try:
        keys = list(client.scan_iter(match=KEY_PREFIX + "*", count=100))
        values = client.mget(keys) if keys else []
        return {k.decode()[len(KEY_PREFIX):]: json.loads(v) for k, v in zip(keys, values) if v}
    finally:
        client.close()

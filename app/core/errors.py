"""Errors of the service core, named the way the API names them.

A core error carries a problem type slug (`unknown-model`, `dataset-not-found`, ...) and says what
kind of failure it is, not which status code to answer with: the API maps the kind to one
(app.api.errors), and the worker records the slug as the job's error code.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    def __init__(self, slug: str, detail: str, title: str | None = None, **extensions: Any):
        super().__init__(detail)
        self.slug, self.detail = slug, detail
        self.title = title or slug.replace("-", " ").capitalize()
        self.extensions = extensions


class Invalid(ServiceError):
    """The request cannot be carried out as given (a bad model name, config, class list, dataset)."""


class NotFound(ServiceError):
    """No such thing, or another tenant's: the two look the same."""


class Conflict(ServiceError):
    """The request contradicts the state it meets (a reused idempotency key, a finished job)."""


class OverQuota(ServiceError):
    """The tenant's stored bytes would pass its quota."""


class Unavailable(ServiceError):
    """Something the request needs is down (the queue); trying again later may work."""


def not_found(kind: str, id_: str) -> NotFound:
    """Also what another tenant's id answers: existence is not revealed across tenants."""
    return NotFound(f"{kind}-not-found", f"no {kind} {id_!r}", title=f"{kind.capitalize()} not found")

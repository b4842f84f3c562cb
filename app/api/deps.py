"""FastAPI dependencies: settings, storage, a DB session per request, the calling tenant."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.auth import tenant_for_key
from app.core.db import session_factory
from app.api.errors import Problem
from app.core.models import Tenant
from app.core.settings import Settings
from app.core.storage import Storage


# These two are `async` only so that FastAPI calls them on the event loop: a sync dependency costs a
# trip to the thread pool, on every request.
async def get_settings(request: Request) -> Settings:
    # Per app, not the process-wide singleton: tests run two apps (SQLite, PostgreSQL) side by side.
    return request.app.state.settings


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_session(settings: Annotated[Settings, Depends(get_settings)]) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer coft_...`")


T = TypeVar("T")

# The pool for the hot paths' blocking work (the gate, predict, `in_session`). asyncio's executor costs
# the event loop, where predict's time goes, about 40% of what anyio.to_thread does per call
# (no capacity limiter, cancel scope or run-var lookups); 40 threads, anyio's own default limit.
_BLOCKING = ThreadPoolExecutor(max_workers=40, thread_name_prefix="coft-blocking")


async def run_blocking(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a worker thread, awaited: a request that goes away does not cancel it."""
    return await asyncio.get_running_loop().run_in_executor(_BLOCKING, function, *args)


async def in_session(settings: Settings, query: Callable[[Session], T]) -> T:
    """`query` in a short session of its own, in one trip to the thread pool. A `SessionDep` costs a
    trip to open the session and another to close it; the hot routes cannot afford three."""

    def run() -> T:
        with session_factory(settings.database_url)() as session:  # closed on the way out; what it
            return query(session)  # returns stays readable, detached: only columns are used

    return await run_blocking(run)


async def current_tenant(request: Request, settings: Annotated[Settings, Depends(get_settings)],
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Tenant:
    # On the event loop: on the gated routes (uploads, predict) the gate has already checked the key.
    if (checked := getattr(request.state, "tenant", None)) is not None:
        return checked
    unauthorized = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Problem(401, "unauthorized", "send an API key as `Authorization: Bearer KEY`", "Unauthorized",
                      headers=unauthorized)
    tenant = await in_session(settings, lambda session: tenant_for_key(session, credentials.credentials))
    if tenant is None:
        raise Problem(401, "unauthorized", "unknown API key", "Unauthorized", headers=unauthorized)
    return tenant


SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[Tenant, Depends(current_tenant)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]

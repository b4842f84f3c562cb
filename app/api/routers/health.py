"""Liveness, readiness and Prometheus metrics (no authentication: for orchestrators and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.core.db import get_engine
from app.api.errors import problem_response

router = APIRouter(tags=["operations"])


@router.get("/livez")
def livez() -> dict:
    """The process serves requests. Says nothing about its dependencies (that is /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is down (problem+json, with `checks`)"}})
def readyz(request: Request):
    """The database answers, Redis answers, and at least one worker has sent a heartbeat."""
    settings = request.app.state.settings
    checks: dict[str, str] = {}
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"error: {type(error).__name__}"
    checks.update(_queue_checks(settings))
    if all(v == "ok" for v in checks.values()):
        return {"status": "ok", "checks": checks}
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    return problem_response(503, "not-ready", "Not ready", f"not ready: {failing}", "/readyz", checks=checks)


def _queue_checks(settings) -> dict[str, str]:
    from app.core.workers import live_workers  # Redis client, imported here so /livez never needs it

    try:
        workers = live_workers(settings)
    except Exception as error:  # noqa: BLE001
        return {"redis": f"error: {type(error).__name__}", "worker": "unknown"}
    return {"redis": "ok", "worker": "ok" if workers else "error: no worker heartbeat"}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

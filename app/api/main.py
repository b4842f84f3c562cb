"""The FastAPI application: `create_app(settings)`; uvicorn runs `app.api.main:app_factory --factory`."""

from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.core import crud, webhooks
from app.core.auth import ensure_key
from app.core.db import session_scope
from app.api.errors import BodySizeLimit, document_problems, install_error_handlers
from app.api import huggingface
from app.api.gate import FileRouteGate, RateLimits, bucket_for
from app.core.logs import configure_logging
from app.api.metrics import LatencyMiddleware, Metrics
from app.core.queue import make_celery
from app.api.inference import LRUCache
from app.api.routers import aliases, classifiers, datasets, health, jobs, models, zero_shot
from app.core.settings import Settings, get_settings
from app.core.storage import get_storage

log = logging.getLogger("app")
UI_DIR = Path(__file__).resolve().parent.parent / "ui"

DESCRIPTION = """
Unsupervised adaptation of CLIP models (CoFT) as a service.

1. `POST /v1/datasets` an archive of unlabelled images;
2. `POST /v1/jobs` with the dataset id and your class names; poll `GET /v1/jobs/{id}`;
3. `POST /v1/classifiers/{id}/predict` with images, or `GET /v1/classifiers/{id}/export` the artifact
   and run it yourself with `coft predict`.

Authenticate with `Authorization: Bearer <API key>`. Errors are RFC 9457 problem+json documents whose
`type` is `https://coft.dev/problems/<slug>`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.bootstrap_api_key:
            with session_scope(settings.database_url) as session:
                ensure_key(session, settings.bootstrap_tenant, settings.bootstrap_api_key)
            log.info("bootstrap API key ensured", extra={"tenant": settings.bootstrap_tenant})
        # Validations cut short by a restart run again (the answer does not depend on who computes it).
        with session_scope(settings.database_url) as session:
            left = crud.datasets_left_validating(session)
        for dataset_id in left:
            threading.Thread(target=crud.validate_dataset, args=(settings, app.state.storage, dataset_id),
                             name=f"validate-{dataset_id}", daemon=True).start()
        dispatcher = webhooks.Dispatcher(settings)  # the API delivers webhook events (see app.core.webhooks)
        dispatcher.start()
        yield
        dispatcher.stop()

    app = FastAPI(title="coft", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.storage = get_storage(settings)
    app.state.metrics = Metrics(settings.database_url)
    # loaded artifacts, by storage key, each with its batcher (stopped when the model leaves the cache)
    app.state.classifiers = LRUCache(settings.classifier_cache_size, on_evict=lambda served: served.batcher.close())
    app.state.backbones = LRUCache(settings.classifier_cache_size)  # zero-shot backbones
    app.state.job_predictions = LRUCache(16)  # a finished job's predictions, parsed once for paging
    app.state.thumbnails = LRUCache(4096)  # small JPEGs (a few kB each) that the dashboard's galleries show
    app.state.dataset_indexes = LRUCache(8)  # the archives they come from, opened once (their directories only)
    # A publisher only; without REDIS_URL job creation answers 503 queue-unavailable.
    app.state.celery = make_celery(settings) if settings.redis_url else None
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit_for=partial(_body_limit, settings))
    # Outside the size limit: who is asking is settled first, from the headers alone.
    app.add_middleware(FileRouteGate, settings=settings, rate_limits=RateLimits(settings))
    app.add_middleware(LatencyMiddleware, metrics=app.state.metrics)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(classifiers.router)
    app.include_router(aliases.router)
    app.include_router(zero_shot.router)
    app.include_router(models.router)
    # The dashboard: static pages over the same API (app/ui; its API key stays in the browser tab).
    app.mount("/ui", DashboardFiles(directory=UI_DIR, html=True), name="ui")
    document_problems(app, gated=lambda method, path: bucket_for(method, path) is not None,
                      schemas=huggingface.component_schemas())
    return app


class DashboardFiles(StaticFiles):
    """The dashboard's files, with headers that keep other origins' scripts and frames out (Alpine.js
    evaluates its expressions with Function, hence 'unsafe-eval'; thumbnails are blob: URLs)."""

    HEADERS = {
        "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-eval'; img-src 'self' blob:; "
                                   "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; "
                                   "frame-ancestors 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(self.HEADERS)
        return response


def _body_limit(settings: Settings, method: str, path: str) -> int:
    """Uploads and predictions carry files; every other body is a small JSON document."""
    if method == "POST" and (path.rstrip("/") == "/v1/datasets" or path.rstrip("/").endswith("/parts")):
        return settings.max_upload_bytes
    if method == "POST" and path.endswith("/predict"):
        return settings.max_predict_bytes
    return 1 << 20


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory`: settings from the environment, JSON logs."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings)

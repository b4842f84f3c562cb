"""Operations: health, readiness, metrics, OpenAPI, logs, bootstrap key, CLI, migrations, `make serve`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.cli import run_migrations
from app.core.db import get_engine
from app.api.main import create_app
from app.core.models import Base
from app.core.logs import configure_logging
from tests.service.conftest import REPO, ServerThread
from app.serve import free_port
from tests.service.helpers import TINY_MODEL, image_zip, png, wait_for
from tests.service.test_jobs import job_body, upload, wait_terminal


def test_livez_readyz_metrics(worker_stack, api):
    assert api.get("/livez").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "worker": "ok"}
    api.post("/v1/zero-shot/predict", data={"class_names": ["a", "b"], "model": TINY_MODEL},
             files=[("images", ("x.png", png(1)))])
    dataset_id = upload(api, image_zip(4))
    job_id = api.post("/v1/jobs", json=job_body(dataset_id, method="zero-shot")).json()["id"]
    assert wait_terminal(api, job_id)["status"] == "succeeded"
    text = api.get("/metrics").text
    assert 'coft_http_request_duration_seconds_count{method="POST",route="/v1/zero-shot/predict",status="200"}' in text
    assert 'coft_predict_batch_size_count{endpoint="zero-shot"}' in text
    assert 'coft_jobs{status="queued"}' in text and 'coft_jobs{status="succeeded"}' in text
    assert 'coft_job_duration_seconds_bucket{le="+Inf",method="zero-shot",status="succeeded"}' in text


def test_worker_keeps_cuda_out_of_its_parent_process(worker_stack):
    from app.core.workers import live_workers

    workers = live_workers(worker_stack.settings)
    assert workers and all(info["cuda_initialized"] is False for info in workers.values())


def test_readyz_reports_what_is_missing(stack):
    no_worker = stack.settings.model_copy(update={"redis_url": stack.settings.redis_url.rsplit("/", 1)[0] + "/9"})
    no_redis = stack.settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    for settings, expected in [(no_worker, {"redis": "ok", "worker": "error: no worker heartbeat"}),
                               (no_redis, {"worker": "unknown"})]:
        server = ServerThread(create_app(settings))
        server.start()
        try:
            response = httpx.get(f"http://127.0.0.1:{server.port}/readyz")
        finally:
            server.stop()
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"] == "https://coft.dev/problems/not-ready" and problem["checks"]["database"] == "ok"
        assert expected.items() <= problem["checks"].items()


def test_openapi_and_docs(stack):
    client = stack.client()
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    for path in ("/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}/cancel", "/v1/classifiers/{classifier_id}/predict",
                 "/v1/classifiers/{classifier_id}/export", "/v1/jobs/{job_id}/predictions", "/v1/zero-shot/predict",
                 "/livez", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    assert spec["components"]["schemas"]["JobCreate"]["examples"][0]["method"] == "coft"
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_unknown_routes_and_methods_are_problems(stack, api):
    for response, status in [(api.get("/v1/nope"), 404), (api.put("/v1/jobs"), 405)]:
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == status


def test_bootstrap_api_key(stack):
    key = "coft_bootstrap_" + os.urandom(8).hex()
    server = ServerThread(create_app(stack.settings.model_copy(update={"bootstrap_api_key": key})))
    server.start()  # the lifespan creates the key; a second start must not fail on the existing one
    server.stop()
    server = ServerThread(create_app(stack.settings.model_copy(update={"bootstrap_api_key": key})))
    server.start()
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    finally:
        server.stop()


def test_cli_create_key(stack):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DATABASE_URL": stack.database_url,
           "COFT_DATA_DIR": str(stack.settings.data_dir)}
    result = subprocess.run([sys.executable, "-m", "app.cli", "create-key", "--tenant", "cli-tenant"],
                            env=env, capture_output=True, text=True, check=True, cwd=REPO)
    key = result.stdout.strip()
    assert key.startswith("coft_")
    assert stack.client(key).get("/v1/datasets").status_code == 200


def test_migrations_match_the_models_and_downgrade(stack, request, tmp_path):
    if stack.backend == "postgresql":
        url = request.getfixturevalue("postgres_server").create_database()
    else:
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    run_migrations(url)
    with get_engine(url).connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes.update(url=url, configure_logging=False)
    command.downgrade(config, "base")
    with get_engine(url).connect() as connection:
        assert set(get_engine(url).dialect.get_table_names(connection)) <= {"alembic_version"}
    command.upgrade(config, "head")


def test_worker_logs_are_json(worker_stack):
    lines = [line for line in worker_stack.worker_log.read_text().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert any(e["message"] == "worker ready" for e in entries)
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in entries)


def test_json_logging_keeps_uvicorn_access_log_on_or_off_as_uvicorn_was_told():
    access, root = logging.getLogger("uvicorn.access"), logging.getLogger()
    saved = access.handlers[:], access.propagate, root.handlers[:], root.level
    try:
        access.handlers[:] = [logging.NullHandler()]  # what uvicorn's default config installs
        configure_logging()
        assert access.propagate and access.hasHandlers()  # access lines go out, as JSON through the root
        access.handlers[:] = []  # what `uvicorn --no-access-log` leaves
        configure_logging()
        assert not access.hasHandlers()  # uvicorn then skips the access line altogether
    finally:
        access.handlers[:], access.propagate, root.handlers[:] = saved[0], saved[1], saved[2]
        root.setLevel(saved[3])


def test_make_serve_runs_everything_and_stops_on_ctrl_c(tmp_path, models_dir):
    """`python -m app.serve` (what `make serve` runs) on a fresh data dir: Redis, migrations, API, worker."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(PYTHONPATH=str(REPO), PORT=str(port), COFT_DATA_DIR=str(tmp_path / "data"),
               COFT_MODELS_DIR=str(models_dir), COFT_DEVICE="cpu", COFT_SWEEP_INTERVAL_S="1")
    serve = subprocess.Popen([sys.executable, "-m", "app.serve"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        def ready():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert serve.poll() is None, serve.stdout.read()
                return False

        wait_for(ready, 120, 0.5, "make serve to be ready")
        assert (tmp_path / "data" / "coft.db").exists()
        serve.send_signal(signal.SIGINT)
        output, _ = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode == 0, output
    assert "Created an API key" in output
    # app.serve runs uvicorn with --no-access-log, and the app's JSON logging must not turn it back on
    # (an access line per request costs the event loop about 5% of a predict request).
    assert '"logger": "uvicorn.access"' not in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2)

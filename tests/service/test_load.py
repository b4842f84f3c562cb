"""The load benchmark's own loop, briefly, in CI: 32 concurrent clients on predict, zero errors."""

from __future__ import annotations

import asyncio
import importlib.util

from app.api.main import create_app
from tests.service.conftest import REPO, ServerThread
from tests.service.test_jobs import job_body, upload, wait_terminal
from tests.service.helpers import image_zip

spec = importlib.util.spec_from_file_location("load_predict", REPO / "benchmarks" / "load_predict.py")
load_predict = importlib.util.module_from_spec(spec)
spec.loader.exec_module(load_predict)


def test_32_concurrent_predict_clients_get_no_errors(stacks):
    stack = stacks("sqlite")
    stack.start_worker()
    key = stack.new_key()
    api = stack.client(key)
    job = wait_terminal(api, api.post("/v1/jobs", json=job_body(upload(api, image_zip(4)), method="zero-shot"))
                        .json()["id"])
    assert job["status"] == "succeeded", job
    server = ServerThread(create_app(stack.settings.model_copy(update={"rate_limit_predict": "1000000/minute"})))
    server.start()
    try:
        latencies, error_count, errors = asyncio.run(load_predict.load(
            f"http://127.0.0.1:{server.port}", key, job["classifier_id"], clients=32, seconds=3, images_per_request=1))
    finally:
        server.stop()
    assert error_count == 0, errors
    assert len(latencies) >= 32

"""Security over real HTTP: a key on every route, tenants invisible to each other on every route,
keys neither logged nor stored, per-tenant rate limits, and no fetching of URLs a user names."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from app.api.main import create_app
from tests.service.conftest import REPO, ServerThread
from app.serve import free_port
from tests.service.helpers import TINY_MODEL, api_answers, image_zip, png, wait_for
from tests.service.test_jobs import job_body, upload, wait_terminal

PROBLEM = "application/problem+json"


def v1_operations(client: httpx.Client) -> list[tuple[str, str]]:
    """(method, path template) of every /v1 operation, from the app's own OpenAPI document."""
    spec = client.get("/openapi.json").json()
    return [(method.upper(), path) for path, item in spec["paths"].items() if path.startswith("/v1/")
            for method in item if method in ("get", "post", "put", "patch", "delete")]


def fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


def send(client: httpx.Client, method: str, path: str, classifier_id: str = "clf_x") -> httpx.Response:
    """A plausible request: predict routes get an image, parts an archive, prediction jobs a body, so
    only authorisation can refuse them."""
    if path.endswith("/predict"):
        return client.request(method, path, files=[("images", ("x.png", png(1)))],
                              data={"class_names": ["a", "b"], "model": TINY_MODEL})
    if path.endswith("/parts"):
        return client.request(method, path, files={"file": ("part.zip", image_zip(1))})
    if method == "POST" and path.endswith("/predictions"):
        return client.request(method, path, json={"dataset_id": "ds_x"})
    if method == "PUT" and path.startswith("/v1/aliases/"):
        return client.request(method, path, json={"classifier_id": classifier_id})
    return client.request(method, path)


def test_every_route_needs_a_valid_key(stack):
    anonymous, wrong = stack.client(), stack.client("coft_" + "0" * 40)
    operations = v1_operations(anonymous)
    assert len(operations) >= 14
    ids = {"dataset_id": "ds_x", "job_id": "job_x", "classifier_id": "clf_x", "alias_name": "production", "index": "0"}
    for client in (anonymous, wrong):
        for method, path in operations:
            response = send(client, method, fill(path, ids))
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["content-type"] == PROBLEM
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["type"] == "https://coft.dev/problems/unauthorized"


@pytest.fixture(scope="module")
def owned(stacks):
    """(stack, key, ids) of one tenant's dataset, finished zero-shot job and classifier (SQLite)."""
    stack = stacks("sqlite")
    stack.start_worker()
    key = stack.new_key()
    api = stack.client(key)
    dataset_id = upload(api, image_zip(4))
    job = wait_terminal(api, api.post("/v1/jobs", json=job_body(dataset_id, method="zero-shot")).json()["id"])
    assert job["status"] == "succeeded", job
    assert api.put("/v1/aliases/production", json={"classifier_id": job["classifier_id"]}).status_code == 200
    return stack, key, {"dataset_id": dataset_id, "job_id": job["id"], "classifier_id": job["classifier_id"],
                        "alias_name": "production", "index": "0"}


def test_another_tenants_ids_are_404_on_every_route(owned):
    stack, key, ids = owned
    intruder = stack.client(stack.new_key())
    operations = v1_operations(intruder)
    with_ids = [(m, p) for m, p in operations if "{" in p]
    assert {name for _, p in with_ids for name in re.findall(r"\{(\w+)\}", p)} == ids.keys()
    for method, path in with_ids:
        response = send(intruder, method, fill(path, ids), classifier_id=ids["classifier_id"])
        kind = re.search(r"\{(\w+?)_(?:id|name)\}", path).group(1)
        if method == "PUT":  # pointing an alias of one's own at another tenant's classifier
            kind = "classifier"
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["type"] == f"https://coft.dev/problems/{kind}-not-found", (method, path)
    # Ids in request bodies too: a job cannot be started on another tenant's dataset or eval set.
    mine = upload(intruder, image_zip(2))
    for body in (job_body(ids["dataset_id"]), job_body(mine, eval_dataset_id=ids["dataset_id"])):
        response = intruder.post("/v1/jobs", json=body)
        assert response.status_code == 404 and response.json()["type"].endswith("/dataset-not-found")
    for listing in ("/v1/datasets", "/v1/jobs", "/v1/classifiers"):
        assert [item["id"] for item in intruder.get(listing).json()["items"]] in ([], [mine])
    owner = stack.client(key)  # and nothing the intruder tried changed anything
    assert owner.get(f"/v1/datasets/{ids['dataset_id']}").status_code == 200
    assert owner.get("/v1/aliases/production").json()["classifier_id"] == ids["classifier_id"]
    assert intruder.get("/v1/aliases").json() == []
    assert owner.get(f"/v1/classifiers/{ids['classifier_id']}").status_code == 200
    assert owner.get(f"/v1/jobs/{ids['job_id']}").json()["status"] == "succeeded"


def test_keys_are_never_logged_or_stored_in_clear(owned):
    """A real API process at DEBUG level, used with a good and a wrong key: neither key appears in
    its output, nor in the worker's log, nor anywhere in the database file."""
    stack, key, ids = owned
    wrong = "coft_" + os.urandom(20).hex()
    port = free_port()
    env = {**stack.env, "COFT_LOG_LEVEL": "DEBUG"}
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.api.main:app_factory", "--factory", "--host",
                            "127.0.0.1", "--port", str(port), "--log-level", "debug"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: api_answers(url), 60, 0.2, "the API process")
        for k in (key, wrong):
            headers = {"Authorization": f"Bearer {k}"}
            httpx.get(f"{url}/v1/datasets", headers=headers)
            httpx.post(f"{url}/v1/datasets", headers=headers, files={"file": ("a.zip", image_zip(1))})
            httpx.post(f"{url}/v1/classifiers/{ids['classifier_id']}/predict", headers=headers,
                       files=[("images", ("x.png", png(1)))])
    finally:
        api.terminate()
        output = api.communicate(timeout=30)[0].decode(errors="replace")
    assert "GET /v1/datasets" in output  # the log was on, and said something
    database = stack.settings.data_dir / "coft.db"
    stored = b"".join(p.read_bytes() for p in database.parent.glob("coft.db*"))
    for k in (key, wrong):
        assert k not in output
        assert k not in stack.worker_log.read_text()
        assert k.encode() not in stored and k[12:].encode() not in stored  # at most a short prefix, for humans


def test_rate_limits_per_tenant_shared_across_api_processes(stack):
    """Two API processes on one Redis share each tenant's count; another tenant has its own."""
    settings = stack.settings.model_copy(update={"rate_limit_uploads": "3/minute", "rate_limit_predict": "4/minute"})
    servers = [ServerThread(create_app(settings)), ServerThread(create_app(settings))]
    for server in servers:
        server.start()
    try:
        key, other_key = stack.new_key(), stack.new_key()
        first, second = (httpx.Client(base_url=f"http://127.0.0.1:{s.port}", headers={"Authorization": f"Bearer {key}"})
                         for s in servers)
        other = httpx.Client(base_url=f"http://127.0.0.1:{servers[0].port}",
                             headers={"Authorization": f"Bearer {other_key}"})
        dataset = {"file": ("a.zip", image_zip(1))}
        assert [c.post("/v1/datasets", files=dataset).status_code for c in (first, second, first)] == [201] * 3
        limited = second.post("/v1/datasets", files=dataset)
        assert limited.status_code == 429, limited.text
        assert limited.headers["content-type"] == PROBLEM
        assert limited.json()["type"] == "https://coft.dev/problems/rate-limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert other.post("/v1/datasets", files=dataset).status_code == 201
        assert first.get("/v1/datasets").status_code == 200  # only uploads and predictions are limited

        image = [("images", ("x.png", png(1)))]
        form = {"class_names": ["a", "b"], "model": TINY_MODEL}
        codes = [c.post("/v1/zero-shot/predict", data=form, files=image).status_code
                 for c in (first, second, first, second)]
        assert codes == [200] * 4
        for path in ("/v1/zero-shot/predict", "/v1/classifiers/clf_any/predict"):  # one bucket for both
            response = first.post(path, data=form, files=image)
            assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert other.post("/v1/zero-shot/predict", data=form, files=image).status_code == 200
    finally:
        for server in servers:
            server.stop()


def test_a_lost_rate_limiter_lets_requests_through(stack):
    """Redis gone (nothing listens) or hung (it accepts and never answers): the gate serves the
    request rather than fail it, within the limiter's timeout."""
    from app.api.gate import LIMITER_TIMEOUT_S

    hung = socket.create_server(("127.0.0.1", 0), backlog=64)  # the kernel accepts; nobody answers
    refused = free_port()
    try:
        for redis_url in (f"redis://127.0.0.1:{refused}/0", f"redis://127.0.0.1:{hung.getsockname()[1]}/0"):
            server = ServerThread(create_app(stack.settings.model_copy(update={"redis_url": redis_url})))
            server.start()
            try:
                client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30,
                                      headers={"Authorization": f"Bearer {stack.new_key()}"})
                response = client.post("/v1/zero-shot/predict", data={"class_names": ["a", "b"], "model": TINY_MODEL},
                                       files=[("images", ("x.png", png(1)))])
                assert response.status_code == 200, (redis_url, response.text)
                assert response.elapsed.total_seconds() < 2 * LIMITER_TIMEOUT_S + 10
            finally:
                server.stop()
    finally:
        hung.close()


class Listener:
    """A TCP port that counts who connects: a server-side fetch of a URL naming it would show here."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


def test_no_server_side_fetching_of_user_urls(stack, api):
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}"
    dataset_id = upload(api, image_zip(2))
    attempts = [
        (api.post("/v1/jobs", json=job_body(dataset_id, backbone={"model": f"{url}/model.json"})), "unknown-model"),
        (api.post("/v1/jobs", json=job_body(dataset_id, backbone={"model": "ViT-B-32", "pretrained": f"{url}/w.pt"})),
         "unknown-model"),
        (api.post("/v1/jobs", json=job_body(dataset_id, backbone={"model": f"local-dir:{url}"})), "unknown-model"),
        (api.post("/v1/jobs", json=job_body(f"{url}/dataset.zip")), "dataset-not-found"),
        (api.post("/v1/jobs", json=job_body(dataset_id, config={"phase1": {"epochs": url}})), "invalid-config"),
        (api.post("/v1/datasets", data={"file": f"{url}/images.zip"}), "validation-error"),
        (api.post("/v1/zero-shot/predict", data={"class_names": ["a", "b"], "model": url},
                  files=[("images", ("x.png", png(1)))]), "unknown-model"),
        (api.post("/v1/zero-shot/predict", data={"class_names": ["a", "b"], "model": TINY_MODEL, "images": url}),
         "validation-error"),
    ]
    for response, slug in attempts:
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["type"] == f"https://coft.dev/problems/{slug}", response.json()
    listener.socket.close()
    assert listener.connections == 0
    assert api.get("/v1/jobs").json()["total"] == 0


def test_the_gate_remembers_known_keys_for_a_while_and_unknown_keys_never(stack):
    from sqlalchemy import delete

    from app.core.auth import KnownKeys, create_key, hash_key
    from app.core.db import session_scope
    from app.core.models import ApiKey

    remembering, asking = KnownKeys(stack.database_url, ttl_s=60), KnownKeys(stack.database_url, ttl_s=0)
    key = "coft_" + os.urandom(20).hex()
    assert remembering.tenant(key) is None  # unknown: not remembered ...
    with session_scope(stack.database_url) as session:
        create_key(session, "later", key)
    tenant = remembering.tenant(key)  # ... so a key created a moment later works at once
    assert tenant is not None and tenant.name == "later" and asking.tenant(key).id == tenant.id
    with session_scope(stack.database_url) as session:
        session.execute(delete(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    assert remembering.tenant(key).id == tenant.id  # within its TTL, from memory: no query
    assert asking.tenant(key) is None  # COFT_API_KEY_CACHE_S=0 asks the database every time

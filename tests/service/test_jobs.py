"""Jobs end to end through the real worker: upload -> job -> poll -> predictions, cancel, idempotency."""

from __future__ import annotations

import pytest

from tests.service.helpers import TINY_CONFIG, TINY_MODEL, image_zip, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


def upload(api, data: bytes) -> str:
    response = api.post("/v1/datasets", files={"file": ("images.zip", data)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_body(dataset_id: str, **overrides) -> dict:
    return {"dataset_id": dataset_id, "class_names": ["cat", "dog"], "method": "coft",
            "backbone": {"model": TINY_MODEL}, "config": TINY_CONFIG, **overrides}


def wait_terminal(api, job_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (job := api.get(f"/v1/jobs/{job_id}").json())["status"] in TERMINAL and job,
                    timeout, 0.1, f"job {job_id} to finish")


@pytest.mark.store
def test_coft_job_end_to_end(worker_stack, api):
    dataset_id = upload(api, image_zip(20))
    eval_id = upload(api, image_zip(6, folder=lambda i: ["cat", "dog"][i % 2]))
    response = api.post("/v1/jobs", json=job_body(dataset_id, eval_dataset_id=eval_id))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["progress"] == 0
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"

    seen_stages = set()

    def finished():
        current = api.get(f"/v1/jobs/{job['id']}").json()
        seen_stages.add(current["stage"])
        return current["status"] in TERMINAL and current

    done = wait_for(finished, 120, 0.05, "job")
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == 1.0 and done["attempts"] == 1 and done["error"] is None
    assert done["classifier_id"].startswith("clf_")
    assert {"zero-shot", "phase1-model1", "phase2-model2"} <= seen_stages
    metrics = done["metrics"]
    for signal in ("s_star_size", "agreement", "clean_fraction_model1", "prediction_entropy"):
        assert signal in metrics
    assert 0.0 <= metrics["accuracy"]["final"] <= 1.0

    predictions = api.get(f"/v1/jobs/{job['id']}/predictions", params={"limit": 5}).json()
    assert predictions["total"] == 20 and len(predictions["items"]) == 5
    assert predictions["items"][0]["name"] == "img000.png"
    assert all(p["label"] in ("cat", "dog") and 0 <= p["probability"] <= 1 for p in predictions["items"])

    listed = api.get("/v1/jobs", params={"status": "succeeded"}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    assert api.get("/v1/jobs", params={"status": "running"}).json()["total"] == 0


def test_a_job_decodes_its_images_once_with_several_threads_in_the_worker(worker_stack, api):
    """Celery's daemonic job processes may not start DataLoader processes; the decoding threads run there."""
    dataset_id = upload(api, image_zip(48))
    body = job_body(dataset_id, config={**TINY_CONFIG, "decode_threads": 2})
    done = wait_terminal(api, api.post("/v1/jobs", json=body).json()["id"])
    assert done["status"] == "succeeded", done["error"]
    cache = done["metrics"]["image_cache"]
    assert cache["images"] == 48 and cache["threads"] == 2 and cache["reused"] is False
    assert cache["bytes"] == 48 * 3 * (32 * 32 + 37 * 37)  # test rows at 32 px, train rows at 1.15 x 32
    assert cache["images_per_s"] > 0


def test_job_validation_problems(stack, api):
    dataset_id = upload(api, image_zip(2))
    eval_id = upload(api, image_zip(4, folder=lambda i: ["cat", "horse"][i % 2]))
    cases = [
        (job_body(dataset_id, backbone={"model": "no-such-model"}), 422, "unknown-model"),
        (job_body(dataset_id, backbone={"model": "../etc"}), 422, "unknown-model"),
        (job_body(dataset_id, backbone={"model": "ViT-B-16"}), 422, "unknown-model"),  # no pretrained tag
        (job_body(dataset_id, config={"phase1": {"epochs": "many"}}), 422, "invalid-config"),
        (job_body(dataset_id, config={"no_such_key": 1}), 422, "invalid-config"),
        (job_body(dataset_id, method="coft+", config={"phase2": {"mixup": 0.3}}), 422, "invalid-config"),
        (job_body(dataset_id, template="no placeholder"), 422, "invalid-template"),
        (job_body(dataset_id, class_names=["cat", "Cat"]), 422, "invalid-class-names"),
        (job_body(dataset_id, class_names=["cat"]), 422, "invalid-class-names"),
        (job_body(dataset_id, method="magic"), 422, "validation-error"),
        (job_body(dataset_id, surprise=True), 422, "validation-error"),
        (job_body("ds_missing"), 404, "dataset-not-found"),
        (job_body(dataset_id, eval_dataset_id=eval_id), 422, "unknown-class"),
    ]
    for body, status, slug in cases:
        response = api.post("/v1/jobs", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == f"https://coft.dev/problems/{slug}", (body, response.json())
    malformed = api.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 422
    assert api.get("/v1/jobs").json()["total"] == 0
    assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert api.get("/v1/jobs/job_missing").json()["type"] == "https://coft.dev/problems/job-not-found"


def test_idempotency_key(stack, api):
    dataset_id = upload(api, image_zip(2))
    body = job_body(dataset_id, method="zero-shot")
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    changed = api.post("/v1/jobs", json={**body, "class_names": ["a", "b"]}, headers={"Idempotency-Key": "abc-1"})
    assert changed.status_code == 409
    assert changed.json()["type"] == "https://coft.dev/problems/idempotency-key-reused"
    # Keys are per tenant: another tenant's identical key is a different job.
    other = stack.client(stack.new_key())
    other_dataset = upload(other, image_zip(2))
    other_job = other.post("/v1/jobs", json=job_body(other_dataset, method="zero-shot"),
                           headers={"Idempotency-Key": "abc-1"})
    assert other_job.status_code == 202 and other_job.json()["id"] != first.json()["id"]
    assert api.get("/v1/jobs").json()["total"] == 1


CANCEL_STAGES = ["zero-shot", "phase1-model1", "phase1-model2", "filter", "phase2-model1", "phase2-model2", "finish"]


@pytest.mark.parametrize("stage", CANCEL_STAGES)
def test_cancel_while_running_at_each_stage(worker_stack, api, stage):
    dataset_id = upload(api, image_zip(20))
    job_id = api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"]
    current = wait_for(lambda: (j := api.get(f"/v1/jobs/{job_id}").json())["stage"] == stage
                       or j["status"] in TERMINAL, 120, 0.02, f"stage {stage}")
    assert current is True or current  # reached the stage
    response = api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("cancelling", "cancelled")
    # Dataset deletion is refused while the job is still active.
    if response.json()["status"] == "cancelling":
        assert api.delete(f"/v1/datasets/{dataset_id}").status_code in (204, 409)
    done = wait_terminal(api, job_id, timeout=10)  # "within seconds"
    assert done["status"] == "cancelled", done
    assert done["classifier_id"] is None
    assert api.get(f"/v1/jobs/{job_id}/predictions").status_code == 409
    assert api.get("/v1/classifiers").json()["total"] == 0
    # Cancelling again is a no-op.
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_cancel_queued_job_and_dataset_in_use(worker_stack, api):
    dataset_id = upload(api, image_zip(20))
    running = api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"]
    queued = api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"]  # waits: one job per worker
    wait_for(lambda: api.get(f"/v1/jobs/{running}").json()["status"] == "running", 60, 0.05, "first job to run")
    conflict = api.delete(f"/v1/datasets/{dataset_id}")
    assert conflict.status_code == 409
    assert conflict.json()["type"] == "https://coft.dev/problems/dataset-in-use"
    assert api.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
    response = api.post(f"/v1/jobs/{queued}/cancel")
    assert response.json()["status"] == "cancelled"  # at once: nothing was running
    assert api.post(f"/v1/jobs/{running}/cancel").status_code == 202
    assert wait_terminal(api, running, 10)["status"] == "cancelled"
    assert api.get(f"/v1/jobs/{queued}").json()["attempts"] == 0  # the worker skipped it
    assert api.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    # A finished job outlives its dataset.
    assert api.get(f"/v1/jobs/{running}").json()["dataset_id"] is None


def test_cancel_finished_job_is_409(worker_stack, api):
    dataset_id = upload(api, image_zip(4))
    job_id = api.post("/v1/jobs", json=job_body(dataset_id, method="zero-shot")).json()["id"]
    assert wait_terminal(api, job_id)["status"] == "succeeded"
    response = api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json()["type"] == "https://coft.dev/problems/job-finished"


def test_failed_job_reports_error(worker_stack, api):
    """A backbone folder removed between submission and run: the job fails with a stable code."""
    import shutil

    models_dir = worker_stack.settings.models_dir
    shutil.copytree(models_dir / TINY_MODEL, models_dir / "doomed")
    dataset_id = upload(api, image_zip(4))
    running = api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"]  # occupies the worker
    doomed = api.post("/v1/jobs", json=job_body(dataset_id, backbone={"model": "doomed"})).json()["id"]
    shutil.rmtree(models_dir / "doomed")
    api.post(f"/v1/jobs/{running}/cancel")
    done = wait_terminal(api, doomed)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "unknown-model" and "doomed" in done["error"]["message"]


@pytest.mark.store
def test_worker_death_requeues_and_resumes_from_checkpoints(worker_stack, api):
    """SIGKILL the process running a job: the sweeper notices the stale heartbeat, re-queues it,
    and the next attempt resumes from the stages already checkpointed, then succeeds."""
    import os
    import signal

    from app.core.db import session_scope
    from app.core.models import Job
    from app.core.storage import get_storage, job_checkpoints

    dataset_id = upload(api, image_zip(20))
    job_id = api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"]
    wait_for(lambda: api.get(f"/v1/jobs/{job_id}").json()["stage"] == "phase1-model2", 120, 0.02, "phase1-model2")
    storage, checkpoints = get_storage(worker_stack.settings), job_checkpoints(job_id)
    assert storage.exists(f"{checkpoints}/phase1-model1.pt")
    with session_scope(worker_stack.database_url) as session:
        pid = int(session.get(Job, job_id).worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    done = wait_terminal(api, job_id, timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    # Cleaned up once the job is over: just after the row says succeeded (the worker writes the row,
    # stops its heartbeat, then deletes), so a client may see "succeeded" a moment before.
    wait_for(lambda: not storage.exists(checkpoints), 30, 0.1, "the checkpoints to be deleted")


def test_the_job_config_schema_is_the_method_config_in_openapi(stack, api):
    document = api.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    config = schemas["JobCreate"]["properties"]["config"]
    assert {"$ref": "#/components/schemas/CoFTConfig"} in config.get("anyOf", [config])
    phase1 = schemas["Phase1Config"]
    assert phase1["additionalProperties"] is False  # unknown keys are refused, and the document says so
    assert phase1["properties"]["negative_classes"]["enum"] == ["uniform", "confusable"]
    assert phase1["properties"]["epochs"]["minimum"] == 0

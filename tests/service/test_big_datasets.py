"""Datasets too big for one request: appended in parts, validated in the background, within a quota."""

from __future__ import annotations

import contextlib

import pytest

from tests.service.helpers import image_tar_gz, image_zip, wait_for
from tests.service.test_jobs import job_body, wait_terminal

pytestmark = pytest.mark.store  # the story on the S3 store too


def wait_validated(api, dataset_id: str) -> dict:
    return wait_for(lambda: (d := api.get(f"/v1/datasets/{dataset_id}").json())["status"] != "validating" and d,
                    60, 0.05, f"dataset {dataset_id} to be validated")


@contextlib.contextmanager
def settings_changed(stack, **values):
    """The running API reads its settings object per request: change it for one test."""
    before = {name: getattr(stack.settings, name) for name in values}
    for name, value in values.items():
        setattr(stack.settings, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(stack.settings, name, value)


def append(api, dataset_id: str, data: bytes, filename: str = "part.zip"):
    return api.post(f"/v1/datasets/{dataset_id}/parts", files={"file": (filename, data)})


def test_a_dataset_in_parts_is_validated_in_the_background_and_trains(worker_stack, api):
    created = api.post("/v1/datasets/uploads", json={"filename": "birds"})
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert (dataset["status"], dataset["num_parts"], dataset["size_bytes"]) == ("uploading", 0, 0)
    dataset_id = dataset["id"]
    # No job on it yet, and nothing to finalise.
    assert api.post("/v1/jobs", json=job_body(dataset_id)).json()["type"].endswith("/dataset-not-ready")
    assert api.post(f"/v1/datasets/{dataset_id}/finalize").json()["type"].endswith("/no-parts")

    sizes = []
    for data, name in [(image_zip(8), "a.zip"), (image_tar_gz(5), "b.tar.gz"),
                       (image_zip(10, extra={"notes.txt": b"hi"}), "c.zip")]:
        answer = append(api, dataset_id, data, name)
        assert answer.status_code == 200, answer.text
        sizes.append(len(data))
    dataset = api.get(f"/v1/datasets/{dataset_id}").json()
    assert (dataset["status"], dataset["num_parts"], dataset["size_bytes"]) == ("uploading", 3, sum(sizes))

    finalised = api.post(f"/v1/datasets/{dataset_id}/finalize")
    assert finalised.status_code == 202 and finalised.json()["status"] in ("validating", "ready")
    dataset = wait_validated(api, dataset_id)
    # img000-img007 are in a.zip and again in c.zip: counted once; photos/p0-p4 from b.tar.gz; img008, img009.
    assert (dataset["status"], dataset["num_images"]) == ("ready", 15), dataset
    assert {r["path"]: r["reason"] for r in dataset["rejected"]}["notes.txt"] == "not an image file"
    assert sum(r["reason"] == "duplicate path in archive" for r in dataset["rejected"]) == 8
    assert append(api, dataset_id, image_zip(2)).json()["type"].endswith("/dataset-not-uploading")
    assert api.post(f"/v1/datasets/{dataset_id}/finalize").status_code == 409

    job = wait_terminal(api, api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"])
    assert job["status"] == "succeeded", job
    predictions = api.get(f"/v1/jobs/{job['id']}/predictions", params={"limit": 100}).json()["items"]
    assert len(predictions) == 15


def test_a_large_archive_is_stored_then_validated_in_the_background(stack, api):
    with settings_changed(stack, inline_validation_bytes=0):
        good = api.post("/v1/datasets", files={"file": ("big.zip", image_zip(6))})
        hostile = api.post("/v1/datasets", files={"file": ("big.zip", image_zip(0, extra={"x.txt": b"no"}))})
    assert good.status_code == 202 and good.json()["status"] == "validating", good.text
    assert good.headers["location"] == f"/v1/datasets/{good.json()['id']}"
    ready = wait_validated(api, good.json()["id"])
    assert (ready["status"], ready["num_images"]) == ("ready", 6)
    assert hostile.status_code == 202
    failed = wait_validated(api, hostile.json()["id"])
    assert failed["status"] == "failed" and failed["error"].startswith("no-usable-images"), failed
    problem = api.post("/v1/jobs", json=job_body(failed["id"])).json()
    assert problem["type"].endswith("/dataset-not-ready") and "no-usable-images" in problem["detail"]


def test_the_tenant_quota_refuses_uploads_and_parts_with_413_and_keeps_what_is_stored(stack, api):
    first = api.post("/v1/datasets", files={"file": ("a.zip", image_zip(4))}).json()
    upload_id = api.post("/v1/datasets/uploads", json={}).json()["id"]
    with settings_changed(stack, tenant_quota_bytes=first["size_bytes"] + 100):
        over = api.post("/v1/datasets", files={"file": ("b.zip", image_zip(4))})
        assert over.status_code == 413, over.text
        problem = over.json()
        assert problem["type"].endswith("/quota-exceeded") and problem["used_bytes"] == first["size_bytes"]
        part = append(api, upload_id, image_zip(4))
        assert part.status_code == 413 and part.json()["type"].endswith("/quota-exceeded")
    # Nothing stored was lost, and the refused bytes were not kept (the part was not counted).
    assert api.get(f"/v1/datasets/{first['id']}").json()["status"] == "ready"
    assert api.get(f"/v1/datasets/{upload_id}").json()["num_parts"] == 0
    assert [d["id"] for d in api.get("/v1/datasets").json()["items"]] == [upload_id, first["id"]]
    with settings_changed(stack, max_dataset_parts=1):
        assert append(api, upload_id, image_zip(2)).status_code == 200
        assert append(api, upload_id, image_zip(2)).json()["type"].endswith("/too-many-parts")


def test_parts_need_the_owner_and_a_key(stack, api):
    upload_id = api.post("/v1/datasets/uploads", json={}).json()["id"]
    stranger = stack.client(stack.new_key())
    assert append(stranger, upload_id, image_zip(2)).status_code == 404
    assert stranger.post(f"/v1/datasets/{upload_id}/finalize").status_code == 404
    assert append(stack.client(), upload_id, image_zip(2)).status_code == 401
    assert api.post("/v1/datasets/uploads", json={"unknown": 1}).status_code == 422

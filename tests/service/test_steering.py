"""Steering a job: start a new one from an old one with labels the user corrected."""

from __future__ import annotations

from tests.service.helpers import image_zip
from tests.service.test_jobs import job_body, upload, wait_terminal


def test_a_child_job_trains_on_the_labels_given_and_names_its_parent(worker_stack, api):
    dataset_id = upload(api, image_zip(20))
    parent = wait_terminal(api, api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"])
    assert parent["status"] == "succeeded" and parent["parent_job_id"] is None
    labels = {"img000.png": "cat", "img001.png": "dog", "img002.png": "cat"}
    child = api.post("/v1/jobs", json=job_body(dataset_id, parent_job_id=parent["id"], labels=labels))
    assert child.status_code == 202, child.text
    assert child.json()["parent_job_id"] == parent["id"] and child.json()["labels"] == labels
    done = wait_terminal(api, child.json()["id"])
    assert done["status"] == "succeeded", done
    assert done["metrics"]["labelled_shots"] == 3
    assert parent["metrics"].get("labelled_shots") is None


def test_labels_are_checked_against_the_dataset_the_classes_and_the_method(stack, api):
    dataset_id = upload(api, image_zip(4))
    problems = [
        (job_body(dataset_id, labels={"nope.png": "cat"}), "unknown-image"),
        (job_body(dataset_id, labels={"img000.png": "horse"}), "unknown-class"),
        (job_body(dataset_id, method="zero-shot", labels={"img000.png": "cat"}), "labels-need-training"),
        (job_body(dataset_id, parent_job_id="job_nope"), "job-not-found"),
    ]
    for body, slug in problems:
        refused = api.post("/v1/jobs", json=body)
        assert refused.status_code in (404, 422) and refused.json()["type"].endswith(f"/{slug}"), refused.text
    assert api.post("/v1/jobs", json=job_body(dataset_id, labels={"img000.png": "cat"})).status_code == 202

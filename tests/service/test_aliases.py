"""Classifier aliases: a name (`production`) usable in place of an id, moved atomically."""

from __future__ import annotations

import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

from tests.service.helpers import image_zip, png
from tests.service.test_jobs import job_body, upload, wait_terminal

CLASSES_A, CLASSES_B = ["cat", "dog"], ["red thing", "blue thing", "green thing"]


def zero_shot_classifier(api, dataset_id: str, class_names: list[str]) -> str:
    body = {**job_body(dataset_id), "method": "zero-shot", "class_names": class_names}
    job = wait_terminal(api, api.post("/v1/jobs", json=body).json()["id"])
    assert job["status"] == "succeeded", job
    return job["classifier_id"]


def labels_via(api, reference: str) -> set[str]:
    answer = api.post(f"/v1/classifiers/{reference}/predict", files=[("images", (f"{i}.png", png(i))) for i in range(6)],
                      params={"top_k": 3})
    assert answer.status_code == 200, answer.text
    return {entry["label"] for p in answer.json()["predictions"] for entry in p["top_k"]}


def test_an_alias_stands_for_its_classifier_and_moves_atomically(worker_stack, api):
    dataset_id = upload(api, image_zip(6))
    first, second = zero_shot_classifier(api, dataset_id, CLASSES_A), zero_shot_classifier(api, dataset_id, CLASSES_B)

    created = api.put("/v1/aliases/production", json={"classifier_id": first})
    assert created.status_code == 200 and created.json()["classifier_id"] == first, created.text
    assert api.get("/v1/classifiers/production").json()["id"] == first
    assert labels_via(api, "production") == set(CLASSES_A)
    exported = api.get("/v1/classifiers/production/export")
    with tarfile.open(fileobj=io.BytesIO(exported.content)) as archive:
        assert {name.split("/")[0] for name in archive.getnames()} == {first}
    assert exported.headers["content-disposition"].endswith(f'{first}.tar.gz"')

    # Requests racing a move each see one classifier whole: all their labels from one class list.
    def predict(_: int) -> set[str]:
        return labels_via(api, "production")

    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(predict, range(24))
        for target in (second, first, second):
            assert api.put("/v1/aliases/production", json={"classifier_id": target}).status_code == 200
        seen = list(answers)
    assert all(labels <= set(CLASSES_A) or labels <= set(CLASSES_B) for labels in seen), seen
    assert labels_via(api, "production") == set(CLASSES_B)
    assert api.get("/v1/aliases").json()[0]["classifier_id"] == second

    # A prediction job named by alias pins the classifier it resolved to.
    job = api.post("/v1/classifiers/production/predictions", json={"dataset_id": dataset_id}).json()
    assert job["classifier_id"] == second
    assert wait_terminal(api, job["id"])["status"] == "succeeded"

    # An aliased classifier is not deleted from under its alias.
    refused = api.delete(f"/v1/classifiers/{second}")
    assert refused.status_code == 409 and refused.json()["aliases"] == ["production"]
    assert api.put("/v1/aliases/staging", json={"classifier_id": "production"}).json()["classifier_id"] == second
    assert api.delete("/v1/aliases/production").status_code == 204
    assert api.delete("/v1/aliases/staging").status_code == 204
    assert api.delete(f"/v1/classifiers/{second}").status_code == 204
    assert api.get("/v1/aliases/production").json()["type"].endswith("/alias-not-found")
    assert api.post("/v1/classifiers/production/predict", files=[("images", ("a.png", png(0)))]).status_code == 404


def test_alias_names_and_targets_are_checked(stack, api):
    for bad in ("clf_abc", "Production", "-x", "a" * 65, "white space"):
        assert api.put(f"/v1/aliases/{bad}", json={"classifier_id": "clf_x"}).status_code in (404, 422), bad
    assert api.put("/v1/aliases/clf_abc", json={"classifier_id": "clf_x"}).status_code == 422
    missing = api.put("/v1/aliases/production", json={"classifier_id": "clf_nope"})
    assert missing.status_code == 404 and missing.json()["type"].endswith("/classifier-not-found")
    assert api.put("/v1/aliases/production", json={}).status_code == 422
    assert api.get("/v1/aliases").json() == []

"""What the method did with each image, as the dashboard reads it: the review sets of a job's
predictions, their filters, and the thumbnails of a dataset's images."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from tests.service.helpers import image_tar_gz, image_zip, png, wait_for
from tests.service.test_jobs import job_body, upload, wait_terminal


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32)), dtype=np.float32)


def _all(api, job_id: str, **params) -> list[dict]:
    page = api.get(f"/v1/jobs/{job_id}/predictions", params={"limit": 200, **params})
    assert page.status_code == 200, page.text
    assert page.json()["total"] == len(page.json()["items"])
    return page.json()["items"]


def test_the_predictions_say_which_images_each_model_trusted_and_filter_by_set_class_and_confidence(worker_stack, api):
    dataset_id = upload(api, image_zip(20))
    labels = {"img003.png": "dog"}
    job = wait_terminal(api, api.post("/v1/jobs", json=job_body(dataset_id, labels=labels)).json()["id"])
    assert job["status"] == "succeeded", job
    metrics = job["metrics"]
    rows = _all(api, job["id"])
    assert [row["index"] for row in rows] == list(range(20))
    assert [row["name"] for row in rows] == [f"img{i:03d}.png" for i in range(20)]
    for row in rows:
        assert row["zero_shot_label"] in ("cat", "dog") and len(row["model_labels"]) == 2 and len(row["clean"]) == 2
    assert [row.get("given_label") for row in rows if row.get("given_label")] == ["dog"]

    # Each set holds what the job's metrics count.
    s_star = _all(api, job["id"], set="s_star")
    assert len(s_star) == metrics["s_star_size"] - 1  # S* also holds the one labelled shot
    assert {row["zero_shot_label"] for row in _all(api, job["id"], set="s_star", label="cat")} == {"cat"}
    for i in (1, 2):
        clean, rejected = _all(api, job["id"], set=f"clean_model{i}"), _all(api, job["id"], set=f"rejected_model{i}")
        assert len(clean) + len(rejected) == 20
        assert all(row["clean"][i - 1] for row in clean) and not any(row["clean"][i - 1] for row in rejected)
        for label in ("cat", "dog"):
            assert all(row["model_labels"][i - 1] == label
                       for row in _all(api, job["id"], set=f"clean_model{i}", label=label))
    agreeing = sum(row["model_labels"][0] == row["model_labels"][1] for row in rows)
    assert round(metrics["agreement"] * 21) - agreeing in (0, 1)  # the metric counts the labelled shot too
    assert [row["name"] for row in _all(api, job["id"], set="labelled")] == ["img003.png"]

    # The final label and confidence filters, and the export keeps the same filters.
    cats = _all(api, job["id"], label="cat")
    assert {row["label"] for row in cats} <= {"cat"} and len(cats) == metrics["final_class_counts"]["cat"]
    middle = sorted(row["probability"] for row in rows)[10]
    confident = _all(api, job["id"], min_probability=middle)
    assert confident and all(row["probability"] >= middle for row in confident)
    assert len(confident) + len(_all(api, job["id"], max_probability=middle)) == 20 + sum(
        row["probability"] == middle for row in rows)
    exported = api.get(f"/v1/jobs/{job['id']}/predictions/export", params={"label": "cat"})
    assert exported.status_code == 200
    assert [line["path"] for line in csv.DictReader(io.StringIO(exported.text))] == [row["name"] for row in cats]

    refused = api.get(f"/v1/jobs/{job['id']}/predictions", params={"set": "everything"})
    assert refused.status_code == 422
    refused = api.get(f"/v1/jobs/{job['id']}/predictions", params={"min_probability": 2})
    assert refused.status_code == 422


@pytest.mark.store
def test_a_thumbnail_is_a_small_jpeg_of_the_tenants_image_and_nobody_elses(stack, api):
    big = {"big.png": png(7, size=300)}
    dataset_id = upload(api, image_zip(3, extra=big))
    names = ["big.png", "img000.png", "img001.png", "img002.png"]  # archive path order
    answer = api.get(f"/v1/datasets/{dataset_id}/images/0/thumbnail")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert "private" in answer.headers["cache-control"]
    assert Image.open(io.BytesIO(answer.content)).size == (128, 128)  # 300 px, made small
    small = api.get(f"/v1/datasets/{dataset_id}/images/0/thumbnail", params={"size": 32})
    assert Image.open(io.BytesIO(small.content)).size == (32, 32)
    assert Image.open(io.BytesIO(api.get(f"/v1/datasets/{dataset_id}/images/1/thumbnail").content)).size == (32, 32)
    assert len(names) == api.get(f"/v1/datasets/{dataset_id}").json()["num_images"]

    missing = api.get(f"/v1/datasets/{dataset_id}/images/4/thumbnail")
    assert missing.status_code == 404 and missing.json()["type"].endswith("/image-not-found")
    assert api.get(f"/v1/datasets/{dataset_id}/images/0/thumbnail", params={"size": 4000}).status_code == 422
    stranger = stack.client(stack.new_key())
    assert stranger.get(f"/v1/datasets/{dataset_id}/images/0/thumbnail").status_code == 404
    assert api.get(f"/v1/datasets/{dataset_id}/images/0/thumbnail", headers={"Authorization": ""}).status_code == 401

    # A dataset in parts, a zip and a tar.gz: image 2 is the tar's first (path order across parts).
    parts = api.post("/v1/datasets/uploads", json={"filename": "parts"}).json()["id"]
    for data, name in [(image_zip(2), "a.zip"), (image_tar_gz(2), "b.tar.gz")]:
        assert api.post(f"/v1/datasets/{parts}/parts", files={"file": (name, data)}).status_code == 200
    assert api.post(f"/v1/datasets/{parts}/finalize").status_code == 202
    wait_for(lambda: api.get(f"/v1/datasets/{parts}").json()["status"] == "ready", 60, 0.05, "validation")
    served = [_pixels(api.get(f"/v1/datasets/{parts}/images/{i}/thumbnail").content) for i in range(4)]
    originals = [_pixels(png(i)) for i in (0, 1)] + [_pixels(png(100 + i)) for i in (0, 1)]
    for i, thumb in enumerate(served):  # each thumbnail is its own image, not a neighbour's
        distances = [np.abs(thumb - original).mean() for original in originals]
        assert int(np.argmin(distances)) == i, distances

    pending = api.post("/v1/datasets/uploads", json={"filename": "later"}).json()["id"]
    refused = api.get(f"/v1/datasets/{pending}/images/0/thumbnail")
    assert refused.status_code == 409 and refused.json()["type"].endswith("/dataset-not-ready")


def test_a_prediction_job_has_only_the_set_of_all_its_images(worker_stack, api):
    dataset_id = upload(api, image_zip(6))
    job = wait_terminal(api, api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"])
    predicting = api.post(f"/v1/classifiers/{job['classifier_id']}/predictions", json={"dataset_id": dataset_id})
    assert predicting.status_code == 202, predicting.text
    done = wait_terminal(api, predicting.json()["id"])
    assert done["status"] == "succeeded", done
    assert [row["index"] for row in _all(api, done["id"])] == list(range(6))
    refused = api.get(f"/v1/jobs/{done['id']}/predictions", params={"set": "s_star"})
    assert refused.status_code == 409 and refused.json()["type"].endswith("/no-review")

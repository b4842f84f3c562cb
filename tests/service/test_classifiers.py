"""Classifiers: predict, export (loaded by `coft predict`), delete, isolation; and zero-shot predict."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.service.helpers import TINY_MODEL, image_zip, png
from tests.service.test_jobs import job_body, upload, wait_terminal

pytestmark = pytest.mark.store  # the story on the S3 store too

_finished: dict[str, tuple[str, dict]] = {}


@pytest.fixture
def adapted(worker_stack):
    """(api client, succeeded CoFT job) per backend, made once: the full upload -> job -> poll story."""
    if worker_stack.backend not in _finished:
        key = worker_stack.new_key()
        api = worker_stack.client(key)
        job_id = api.post("/v1/jobs", json=job_body(upload(api, image_zip(20)))).json()["id"]
        job = wait_terminal(api, job_id)
        assert job["status"] == "succeeded", job
        _finished[worker_stack.backend] = (key, job)
    key, job = _finished[worker_stack.backend]
    return worker_stack.client(key), job


def images(*seeds: int):
    return [("images", (f"photo{seed}.png", png(seed), "image/png")) for seed in seeds]


def test_classifier_predict_and_read(adapted):
    api, job = adapted
    classifier_id = job["classifier_id"]
    classifier = api.get(f"/v1/classifiers/{classifier_id}").json()
    assert classifier["job_id"] == job["id"] and classifier["class_names"] == ["cat", "dog"]
    assert classifier["method"] == "coft" and classifier["num_members"] == 2 and classifier["size_bytes"] > 0
    assert classifier["backbone"] == {"model": TINY_MODEL, "pretrained": None}
    assert classifier_id in [c["id"] for c in api.get("/v1/classifiers").json()["items"]]

    response = api.post(f"/v1/classifiers/{classifier_id}/predict", files=images(1, 2, 3), params={"top_k": 2})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["photo1.png", "photo2.png", "photo3.png"]
    for p in predictions:
        assert p["label"] in ("cat", "dog")
        assert len(p["top_k"]) == 2 and p["top_k"][0] == {"label": p["label"], "probability": p["probability"]}
        assert abs(sum(t["probability"] for t in p["top_k"]) - 1) < 1e-4
    # The job's dataset predictions and the predict endpoint come from the same classifier.
    img000 = api.get(f"/v1/jobs/{job['id']}/predictions", params={"limit": 1}).json()["items"][0]
    again = api.post(f"/v1/classifiers/{classifier_id}/predict", files=[("images", ("x.png", png(0)))]).json()
    assert again["predictions"][0]["label"] == img000["label"]
    assert abs(again["predictions"][0]["probability"] - img000["probability"]) < 1e-4


def forward_passes(api) -> tuple[float, float]:
    """(forward passes, images) the API's batchers have run for classifiers, from /metrics."""
    values = {}
    for line in api.get("/metrics").text.splitlines():
        for name in ("count", "sum"):
            if line.startswith(f'coft_predict_forward_batch_size_{name}{{endpoint="classifier"}}'):
                values[name] = float(line.split()[-1])
    return values.get("count", 0.0), values.get("sum", 0.0)


def test_concurrent_predicts_share_forward_passes_and_get_their_own_answers(adapted):
    api, job = adapted
    url = f"/v1/classifiers/{job['classifier_id']}/predict"
    requests = [images(seed, seed + 100) for seed in range(24)]
    alone = [api.post(url, files=files).json()["predictions"] for files in requests[:4]]
    passes_before, images_before = forward_passes(api)
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda files: api.post(url, files=files), requests))
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers if a.status_code != 200]
    together = [answer.json()["predictions"] for answer in answers]
    for i, predictions in enumerate(together):
        assert [p["filename"] for p in predictions] == [f"photo{i}.png", f"photo{i + 100}.png"]
    for one, shared in zip(alone, together):  # batched with strangers, the same numbers
        assert [p["label"] for p in one] == [p["label"] for p in shared]
        assert all(abs(a["probability"] - b["probability"]) < 1e-4 for a, b in zip(one, shared))
    passes_after, images_after = forward_passes(api)
    assert images_after - images_before == 48
    assert passes_after - passes_before < 24  # some requests shared a forward pass


def test_predict_refuses_bad_images(adapted, stack):
    api, job = adapted
    url = f"/v1/classifiers/{job['classifier_id']}/predict"
    bad = api.post(url, files=images(1) + [("images", ("notes.png", b"not an image"))])
    assert bad.status_code == 422
    problem = bad.json()
    assert problem["type"] == "https://coft.dev/problems/unusable-image"
    assert [r["filename"] for r in problem["rejected"]] == ["notes.png"]
    assert api.post(url).status_code == 422  # no images at all
    # predict parses its own multipart body (off the event loop): files in other fields are not images,
    # and a body that is not valid multipart is a 400 problem, as FastAPI's form parsing answers
    elsewhere = api.post(url, files=[("image", ("x.png", png(1)))], data={"images": "x.png"})
    assert elsewhere.status_code == 422 and elsewhere.json()["type"] == "https://coft.dev/problems/no-usable-images"
    mangled = api.post(url, content=b"--b\r\nContent-Disposition: form-data\r\n\r\nhalf a part",
                       headers={"Content-Type": "multipart/form-data"})  # no boundary
    assert mangled.status_code == 400 and mangled.headers["content-type"] == "application/problem+json"
    too_many = api.post(url, files=images(*range(stack.settings.max_predict_images + 1)))
    assert too_many.json()["type"] == "https://coft.dev/problems/too-many-images"


def test_export_is_what_coft_predict_loads(adapted, tmp_path):
    api, job = adapted
    classifier_id = job["classifier_id"]
    response = api.get(f"/v1/classifiers/{classifier_id}/export")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    assert f'filename="{classifier_id}.tar.gz"' in response.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path, filter="data")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(png(0))
    subprocess.run([sys.executable, "-m", "coft.cli", "predict", "--classifier", str(tmp_path / classifier_id),
                    "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out.csv"), "--device", "cpu"],
                   check=True, capture_output=True)
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    served = api.post(f"/v1/classifiers/{classifier_id}/predict", files=[("images", ("x.png", png(0)))]).json()
    assert rows[0]["label"] == served["predictions"][0]["label"]
    assert abs(float(rows[0]["probability"]) - served["predictions"][0]["probability"]) < 1e-4

    as_zip = api.get(f"/v1/classifiers/{classifier_id}/export", params={"format": "zip"})
    assert as_zip.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(as_zip.content)).namelist()
    assert sorted(names) == [f"{classifier_id}/classifier.json", f"{classifier_id}/model.safetensors"]


def test_onnx_export_matches_predict_and_is_made_once(adapted, tmp_path):
    import json as json_module

    import numpy as np
    import onnx
    import onnxruntime

    from coft import Classifier as LoadedClassifier

    api, job = adapted
    classifier_id = job["classifier_id"]
    response = api.get(f"/v1/classifiers/{classifier_id}/export", params={"format": "onnx"})
    assert response.status_code == 200, response.text
    assert f'filename="{classifier_id}.onnx.zip"' in response.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert sorted(archive.namelist()) == [f"{classifier_id}/{name}" for name in
                                          ("ensemble.onnx", "member-0.onnx", "member-1.onnx")]
    archive.extractall(tmp_path)
    ensemble = onnx.load(str(tmp_path / classifier_id / "ensemble.onnx"))
    metadata = {p.key: p.value for p in ensemble.metadata_props}
    assert json_module.loads(metadata["class_names"]) == ["cat", "dog"]
    # The preprocessing the metadata names, then the ONNX ensemble: the service's own answer.
    with tarfile.open(fileobj=io.BytesIO(api.get(f"/v1/classifiers/{classifier_id}/export").content)) as tar:
        tar.extractall(tmp_path / "artifact", filter="data")
    loaded = LoadedClassifier.load(tmp_path / "artifact" / classifier_id, device="cpu")
    assert loaded.preprocess_cfg == json_module.loads(metadata["preprocessing"])
    from coft import decode_image
    pixels = loaded.transform()(decode_image(png(0))).unsqueeze(0).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / classifier_id / "ensemble.onnx"),
                                           providers=["CPUExecutionProvider"])
    [probabilities] = session.run(["probabilities"], {"pixels": pixels})
    served = api.post(f"/v1/classifiers/{classifier_id}/predict", files=[("images", ("x.png", png(0)))]).json()
    best = served["predictions"][0]
    assert ["cat", "dog"][int(np.argmax(probabilities[0]))] == best["label"]
    assert abs(float(probabilities[0].max()) - best["probability"]) < 1e-4
    again = api.get(f"/v1/classifiers/{classifier_id}/export", params={"format": "onnx"})
    assert again.content == response.content  # kept with the artifact, not made again


def test_other_tenants_see_nothing(adapted, stack):
    api, job = adapted
    other = stack.client(stack.new_key())
    classifier_id = job["classifier_id"]
    for method, url in [("GET", f"/v1/classifiers/{classifier_id}"), ("GET", f"/v1/classifiers/{classifier_id}/export"),
                        ("DELETE", f"/v1/classifiers/{classifier_id}"), ("GET", f"/v1/jobs/{job['id']}"),
                        ("GET", f"/v1/jobs/{job['id']}/predictions"), ("POST", f"/v1/jobs/{job['id']}/cancel")]:
        response = other.request(method, url)
        assert response.status_code == 404, (method, url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    assert other.post(f"/v1/classifiers/{classifier_id}/predict", files=images(1)).status_code == 404
    assert other.get("/v1/classifiers").json()["total"] == 0
    assert other.get("/v1/jobs").json()["total"] == 0
    assert api.get(f"/v1/classifiers/{classifier_id}").status_code == 200


def test_delete_classifier(worker_stack, api):
    job_id = api.post("/v1/jobs", json=job_body(upload(api, image_zip(4)), method="zero-shot")).json()["id"]
    job = wait_terminal(api, job_id)
    assert job["status"] == "succeeded", job
    classifier_id = job["classifier_id"]
    assert api.post(f"/v1/classifiers/{classifier_id}/predict", files=images(1)).status_code == 200  # now cached
    assert api.delete(f"/v1/classifiers/{classifier_id}").status_code == 204
    assert api.get(f"/v1/classifiers/{classifier_id}").status_code == 404
    assert api.post(f"/v1/classifiers/{classifier_id}/predict", files=images(1)).status_code == 404
    assert api.get(f"/v1/jobs/{job_id}").json()["classifier_id"] is None
    assert not (worker_stack.settings.data_dir / "store" / "classifiers" / classifier_id).exists()


def test_zero_shot_predict(stack, api):
    form = {"class_names": ["cat", "dog", "bird"], "model": TINY_MODEL}
    response = api.post("/v1/zero-shot/predict", data=form, files=images(1, 2), params={"top_k": 3})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["photo1.png", "photo2.png"]
    assert all(p["label"] in form["class_names"] and len(p["top_k"]) == 3 for p in predictions)
    again = api.post("/v1/zero-shot/predict", data=form, files=images(1)).json()["predictions"][0]
    assert again["label"] == predictions[0]["label"]

    problems = [
        ({"class_names": ["cat"], "model": TINY_MODEL}, "invalid-class-names"),
        ({"class_names": ["cat", "dog"], "model": "nope"}, "unknown-model"),
        ({"class_names": ["cat", "dog"], "model": TINY_MODEL, "template": "no slot"}, "invalid-template"),
    ]
    for data, slug in problems:
        response = api.post("/v1/zero-shot/predict", data=data, files=images(1))
        assert response.status_code == 422 and response.json()["type"].endswith(slug), response.text
    assert api.post("/v1/zero-shot/predict", data=form).status_code == 422  # no images
    assert stack.client().post("/v1/zero-shot/predict", data=form, files=images(1)).status_code == 401


def test_a_prediction_job_labels_a_stored_dataset_and_exports_it(adapted):
    api, job = adapted
    classifier_id = job["classifier_id"]
    dataset_id = api.post("/v1/datasets", files={"file": ("new.zip", image_zip(12))}).json()["id"]
    created = api.post(f"/v1/classifiers/{classifier_id}/predictions", json={"dataset_id": dataset_id, "top_k": 2})
    assert created.status_code == 202, created.text
    assert created.headers["location"] == f"/v1/jobs/{created.json()['id']}"
    assert created.json()["method"] == "predict" and created.json()["classifier_id"] == classifier_id
    done = wait_terminal(api, created.json()["id"])
    assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["metrics"]["images"] == 12, done

    page = api.get(f"/v1/jobs/{done['id']}/predictions", params={"limit": 5, "offset": 10}).json()
    assert page["total"] == 12 and [p["name"] for p in page["items"]] == ["img010.png", "img011.png"]
    first = api.get(f"/v1/jobs/{done['id']}/predictions", params={"limit": 1}).json()["items"][0]
    assert len(first["top_k"]) == 2 and first["top_k"][0] == {"label": first["label"], "probability": first["probability"]}
    alone = api.post(f"/v1/classifiers/{classifier_id}/predict", files=[("images", ("a.png", png(0)))]).json()
    assert alone["predictions"][0]["label"] == first["label"]  # img000.png is png(0): the same answer
    assert abs(alone["predictions"][0]["probability"] - first["probability"]) < 1e-4

    csv_file = api.get(f"/v1/jobs/{done['id']}/predictions/export", params={"format": "csv"})
    assert csv_file.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(csv_file.text)))
    assert rows[0] == ["path", "label", "probability"] and len(rows) == 13 and rows[1][:2] == ["img000.png", first["label"]]
    lines = api.get(f"/v1/jobs/{done['id']}/predictions/export", params={"format": "jsonl"}).text.splitlines()
    assert len(lines) == 12 and json.loads(lines[0]) == first
    assert api.get(f"/v1/jobs/{done['id']}/predictions/export", params={"format": "xml"}).status_code == 422


def test_a_prediction_job_needs_a_ready_dataset_and_its_classifier_waits_for_it(worker_stack, api):
    dataset_id = api.post("/v1/datasets", files={"file": ("a.zip", image_zip(4))}).json()["id"]
    made = wait_terminal(api, api.post("/v1/jobs", json={**job_body(dataset_id), "method": "zero-shot"}).json()["id"])
    classifier_id = made["classifier_id"]
    upload_id = api.post("/v1/datasets/uploads", json={}).json()["id"]
    problem = api.post(f"/v1/classifiers/{classifier_id}/predictions", json={"dataset_id": upload_id}).json()
    assert problem["type"].endswith("/dataset-not-ready")
    assert api.post(f"/v1/classifiers/{classifier_id}/predictions", json={"dataset_id": "ds_nope"}).status_code == 404
    assert api.post("/v1/classifiers/clf_nope/predictions", json={"dataset_id": dataset_id}).status_code == 404
    worker_stack.stop_worker()  # the job stays queued
    queued = api.post(f"/v1/classifiers/{classifier_id}/predictions", json={"dataset_id": dataset_id}).json()
    refused = api.delete(f"/v1/classifiers/{classifier_id}")
    assert refused.status_code == 409 and refused.json()["jobs"] == [queued["id"]]
    assert api.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert api.delete(f"/v1/classifiers/{classifier_id}").status_code == 204

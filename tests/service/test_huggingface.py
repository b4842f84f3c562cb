"""Both predict routes also speak the Hugging Face inference JSON payload, and answer in its shape."""

from __future__ import annotations

import base64

from tests.service.helpers import image_zip, png
from tests.service.test_jobs import job_body, upload, wait_terminal

CLASSES = ["cat", "dog", "bird"]


def b64(seed: int) -> str:
    return base64.b64encode(png(seed)).decode()


def multipart_top(api, url: str, seed: int, **form) -> list[dict]:
    answer = api.post(url, data=form, files=[("images", ("x.png", png(seed), "image/png"))], params={"top_k": 100})
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"][0]["top_k"]


def test_zero_shot_takes_the_pipeline_payload_and_answers_label_score_lists(stack, api):
    url = "/v1/zero-shot/predict"
    template = "This is a photo of {}."
    answer = api.post(url, json={"inputs": b64(1), "parameters": {"candidate_labels": CLASSES,
                                                                   "hypothesis_template": template}})
    assert answer.status_code == 200, answer.text
    scores = answer.json()
    assert sorted(s["label"] for s in scores) == sorted(CLASSES)
    assert [s["score"] for s in scores] == sorted((s["score"] for s in scores), reverse=True)
    assert abs(sum(s["score"] for s in scores) - 1) < 1e-4
    same = multipart_top(api, url, 1, class_names=CLASSES, template=template)  # the same model and prompts
    assert [(s["label"], round(s["score"], 4)) for s in scores] == [(s["label"], round(s["probability"], 4)) for s in same]

    several = api.post(url, json={"inputs": [b64(1), b64(2)], "parameters": {"candidate_labels": CLASSES}}).json()
    assert len(several) == 2 and all(len(one) == 3 for one in several)
    top = api.post(url, json={"inputs": b64(1), "parameters": {"candidate_labels": CLASSES, "top_k": 1}}).json()
    assert len(top) == 1

    problems = [
        ({"inputs": "not base64!", "parameters": {"candidate_labels": CLASSES}}, "invalid-base64"),
        ({"inputs": base64.b64encode(b"not an image").decode(), "parameters": {"candidate_labels": CLASSES}},
         "unusable-image"),
        ({"inputs": b64(1)}, "invalid-class-names"),
        ({"inputs": b64(1), "parameters": {"candidate_labels": ["cat"]}}, "invalid-class-names"),
        ({"inputs": b64(1), "parameters": {"candidate_labels": CLASSES, "hypothesis_template": "no slot"}},
         "invalid-template"),
        ({"images": b64(1)}, "validation-error"),
    ]
    for body, slug in problems:
        refused = api.post(url, json=body)
        assert refused.status_code == 422 and refused.json()["type"].endswith(f"/{slug}"), (body, refused.text)
    assert api.post(url, content=b"{not json", headers={"content-type": "application/json"}).status_code == 422


def test_a_classifier_takes_the_pipeline_payload_too(worker_stack, api):
    dataset_id = upload(api, image_zip(4))
    job = wait_terminal(api, api.post("/v1/jobs", json={**job_body(dataset_id), "method": "zero-shot",
                                                         "class_names": CLASSES}).json()["id"])
    url = f"/v1/classifiers/{job['classifier_id']}/predict"
    scores = api.post(url, json={"inputs": b64(3)}).json()
    same = multipart_top(api, url, 3)
    assert [(s["label"], round(s["score"], 4)) for s in scores] == [(s["label"], round(s["probability"], 4)) for s in same]
    picked = api.post(url, json={"inputs": b64(3), "parameters": {"candidate_labels": ["dog", "cat"]}}).json()
    assert {s["label"] for s in picked} == {"dog", "cat"} and abs(sum(s["score"] for s in picked) - 1) < 1e-4
    probability = {s["label"]: s["probability"] for s in same}
    assert abs(picked[0]["score"] - max(probability["dog"], probability["cat"]) / (probability["dog"] + probability["cat"])) < 1e-4
    unknown = api.post(url, json={"inputs": b64(3), "parameters": {"candidate_labels": ["horse"]}})
    assert unknown.status_code == 422 and unknown.json()["type"].endswith("/unknown-class")


def test_the_openapi_document_shows_both_bodies(stack, api):
    document = api.get("/openapi.json").json()
    for path in ("/v1/zero-shot/predict", "/v1/classifiers/{classifier_id}/predict"):
        operation = document["paths"][path]["post"]
        assert {"multipart/form-data", "application/json"} <= set(operation["requestBody"]["content"])
        answers = operation["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
        assert {"$ref": "#/components/schemas/PredictResponse"} in answers
    assert {"HFRequest", "HFParameters", "HFLabelScore"} <= set(document["components"]["schemas"])

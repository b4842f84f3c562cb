"""CoFT+ through the service: class descriptions in the job body reach the pipeline, and the job
records which prompt source it used."""

from __future__ import annotations

from tests.service.helpers import TINY_CONFIG, TINY_MODEL, image_zip, wait_for
from tests.service.test_jobs import TERMINAL, upload


def test_coft_plus_job_with_class_descriptions(worker_stack, api):
    dataset_id = upload(api, image_zip(12))
    descriptions = {"cat": ["a photo of a cat, a small furry pet."], "dog": ["a photo of a dog, a loyal pet."]}
    body = {"dataset_id": dataset_id, "class_names": ["cat", "dog"], "method": "coft+",
            "backbone": {"model": TINY_MODEL}, "config": {**TINY_CONFIG, "coft_plus": {"rounds": 2}},
            "class_descriptions": descriptions}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    done = wait_for(lambda: (job := api.get(f"/v1/jobs/{job_id}").json())["status"] in TERMINAL and job,
                    120, 0.1, "coft+ job")
    assert done["status"] == "succeeded", done["error"]
    assert done["method"] == "coft+"
    assert done["metrics"]["prompt_source"] == "user"
    assert "phase1_model1_round2_losses" in done["metrics"]


def test_class_descriptions_must_cover_the_classes(stack, api):
    dataset_id = upload(api, image_zip(2))
    for descriptions in ({"cat": ["a cat."]}, {"cat": ["a cat."], "dog": []}, {"cat": ["a"], "dog": ["b"], "cow": ["c"]}):
        response = api.post("/v1/jobs", json={"dataset_id": dataset_id, "class_names": ["cat", "dog"],
                                              "method": "coft+", "class_descriptions": descriptions})
        assert response.status_code == 422, response.text
        assert response.json()["type"] == "https://coft.dev/problems/validation-error"

"""Classifiers: the artifacts of succeeded jobs. Read, delete, predict, export."""

from __future__ import annotations

import os
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from coft import Classifier as CoftClassifier
from app.api.deps import SessionDep, SettingsDep, StorageDep, TenantDep, run_blocking
from app.core.db import get_engine
from app.api import huggingface
from app.api.inference import ServedClassifier, decode_images, multipart_files, prediction_items
from app.api.pagination import PageDep, newest_first
from app.api.schemas import ClassifierOut, JobOut, Page, PredictionJobCreate, PredictResponse
from app.core import crud
from app.core.models import Classifier

router = APIRouter(prefix="/v1/classifiers", tags=["classifiers"])


def get_owned_classifier(session, tenant, classifier_id: str) -> Classifier:
    """By id or by alias (`PUT /v1/aliases/{name}`): every route but delete takes either."""
    return crud.classifier_by_id_or_alias(session, tenant.id, classifier_id)


@router.get("", response_model=Page[ClassifierOut])
def list_classifiers(session: SessionDep, tenant: TenantDep, page: PageDep) -> dict:
    return newest_first(session, Classifier, tenant.id, page)


@router.get("/{classifier_id}", response_model=ClassifierOut)
def get_classifier(classifier_id: str, session: SessionDep, tenant: TenantDep) -> Classifier:
    return get_owned_classifier(session, tenant, classifier_id)


@router.delete("/{classifier_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_classifier(classifier_id: str, request: Request, session: SessionDep, tenant: TenantDep,
                      storage: StorageDep) -> None:
    artifact_key = crud.delete_classifier(session, tenant.id, storage, classifier_id)
    request.app.state.classifiers.discard(artifact_key)


@router.post("/{classifier_id}/predict", response_model=PredictResponse,
             responses={422: {"description": "an image could not be used (problem lists which and why)"}},
             openapi_extra=huggingface.openapi_extra("PredictResponse", multipart=True))
async def predict(classifier_id: str, request: Request, settings: SettingsDep, storage: StorageDep,
                  tenant: TenantDep, top_k: Annotated[int, Query(ge=1, le=100)] = 5) -> Response:
    """Label each image (multipart field `images`, repeated): the label, its probability, the top k.
    Or the Hugging Face inference JSON payload (`inputs` base64; optional `parameters.candidate_labels`,
    some of the classes, and `parameters.top_k`), answered as `[{label, score}]`.
    Concurrent requests for one classifier share forward passes (COFT_PREDICT_MAX_BATCH images,
    waiting at most COFT_PREDICT_MAX_WAIT_MS for a batch to fill)."""
    # The hot path of the service: on the event loop only what must be there (the body's bytes, the
    # batch's answer); the body is parsed, the classifier looked up, decoded and transformed in one trip
    # to the thread pool, and the answer is serialised without FastAPI's response validation.
    metrics = request.app.state.metrics
    content_type = request.headers.get("content-type", "")
    body = await request.body()

    def load(artifact_key: str) -> ServedClassifier:
        with storage.local_dir(artifact_key) as path:
            classifier = CoftClassifier.load(path, device=settings.device)
        return ServedClassifier.start(classifier, settings, name=artifact_key,
                                      on_batch=metrics.forward_batch.labels("classifier").observe)

    def prepare() -> tuple[huggingface.HFRequest | None, list[str], ServedClassifier, torch.Tensor]:
        with get_engine(settings.database_url).connect() as connection:
            artifact_key = crud.artifact_key_of(connection, tenant.id, classifier_id)
        payload = huggingface.parse_hf_request(body) if huggingface.is_json(content_type) else None
        named = huggingface.hf_images(payload) if payload is not None else \
            multipart_files(content_type, body, "images", settings.data_limits().max_file_bytes)
        image_set = decode_images(named, settings)
        served = request.app.state.classifiers.get(artifact_key, lambda: load(artifact_key))
        return payload, image_set.names, served, served.pixels(image_set)

    payload, names, served, pixels = await run_blocking(prepare)
    metrics.predict_batch.labels("classifier").observe(len(pixels))
    predictions = await served.predict(pixels)
    if payload is not None:
        return JSONResponse(huggingface.hf_answer(payload, predictions))
    answer = PredictResponse(predictions=prediction_items(names, predictions, top_k))
    return Response(answer.model_dump_json(), media_type="application/json")


@router.post("/{classifier_id}/predictions", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={404: {"description": "classifier or dataset not found"},
                        409: {"description": "the dataset is not ready"}})
def predict_dataset(classifier_id: str, body: PredictionJobCreate, request: Request, response: Response,
                    session: SessionDep, tenant: TenantDep) -> JobOut:
    """Label every image of a stored dataset, as a job (progress, ETA, cancel) for sets too large for
    predict requests. Read the result with `GET /v1/jobs/{id}/predictions` (pages) or
    `GET /v1/jobs/{id}/predictions/export?format=csv|jsonl` (the whole file)."""
    job = crud.create_prediction_job(session, tenant.id, classifier_id, body.dataset_id, body.top_k,
                                     request.app.state.celery)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.model_validate(job)


@router.get("/{classifier_id}/export", response_class=FileResponse,
            responses={200: {"content": {"application/gzip": {}, "application/zip": {}},
                             "description": "the artifact directory, as `<classifier_id>/...`; with format=onnx a "
                                            "zip of `<classifier_id>/ensemble.onnx` and `member-<i>.onnx`"}})
def export(classifier_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep,
           format: Literal["tar.gz", "zip", "onnx"] = "tar.gz") -> FileResponse:
    """Download the artifact: unpack it and run `coft predict --classifier <classifier_id> ...`; or, with
    `format=onnx`, the ensemble and each member as ONNX, preprocessing and class names in their metadata
    (made once per artifact, then kept with it)."""
    row = get_owned_classifier(session, tenant, classifier_id)
    session.close()  # an ONNX export takes a while: do not hold a pooled connection meanwhile
    archive_path = crud.export_archive(storage, row, format)
    media_type = "application/gzip" if format == "tar.gz" else "application/zip"
    suffix = "onnx.zip" if format == "onnx" else format
    return FileResponse(archive_path, media_type=media_type, filename=f"{row.id}.{suffix}",
                        background=BackgroundTask(os.unlink, archive_path))

"""Jobs: create (idempotently), watch, cancel, and read the predictions on the job's own images."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from coft import CoFTConfig, DataError, open_labelled_images
from app import backbones
from app.deps import SessionDep, get_owned, SettingsDep, StorageDep, TenantDep
from app.errors import Problem
from app.jobs import fail_unqueued, request_cancel
from app.models import Job, JobStatus
from app.pagination import PageDep, paginate
from app.queue import enqueue_job
from app.routers.datasets import get_owned_dataset
from app.schemas import DatasetPrediction, JobCreate, JobOut, JobStatusName, Page
from app.storage import dataset_archive, job_predictions

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger("app.jobs")


def method_config(body: JobCreate) -> dict:
    """The user's overrides with the template folded in, validated by coft (422 on unknown keys/types)."""
    overrides = json.loads(json.dumps(body.config or {}))
    if body.template is not None:
        if not isinstance(overrides.setdefault("pseudo_labels", {}), dict):
            raise Problem(422, "invalid-config", "config.pseudo_labels must be an object", "Invalid config")
        overrides["pseudo_labels"]["template"] = body.template
    try:
        CoFTConfig.from_dict(overrides)
    except ValueError as error:
        raise Problem(422, "invalid-config", str(error), "Invalid config") from None
    return overrides


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={404: {"description": "dataset not found"}, 409: {"description": "Idempotency-Key reused "
                        "with a different body"}, 422: {"description": "invalid job (unknown-model, invalid-config, "
                        "unknown-class, validation-error)"}})
def create_job(body: JobCreate, request: Request, response: Response, session: SessionDep, tenant: TenantDep,
               settings: SettingsDep, storage: StorageDep,
               idempotency_key: Annotated[str | None, Header(max_length=200, description=(
                   "retrying with the same key returns the first job instead of creating another"))] = None) -> JobOut:
    """Start adapting a backbone to `class_names` on a dataset. Answers at once; poll the job."""
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key is not None:
        replay = _replay(session, tenant.id, idempotency_key, request_hash, response)
        if replay is not None:
            return replay
    dataset = get_owned_dataset(session, tenant, body.dataset_id)
    if body.eval_dataset_id is not None:
        _check_eval_dataset(get_owned_dataset(session, tenant, body.eval_dataset_id).id, body, storage, settings)
    model = body.backbone.model if body.backbone else settings.default_model
    pretrained = body.backbone.pretrained if body.backbone else None
    backbones.resolve(settings, model, pretrained)
    job = Job(tenant_id=tenant.id, dataset_id=dataset.id, eval_dataset_id=body.eval_dataset_id,
              class_names=body.class_names, method=body.method, backbone_model=model, backbone_pretrained=pretrained,
              template=body.template, config=method_config(body), class_descriptions=body.class_descriptions,
              idempotency_key=idempotency_key,
              request_hash=request_hash)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        replay = _replay(session, tenant.id, idempotency_key, request_hash, response)
        if replay is None:
            raise
        return replay
    # Committed before it is enqueued: the worker must find the row the message points to.
    try:
        enqueue_job(request.app.state.celery, job.id)
    except Exception as error:  # noqa: BLE001 - any broker failure
        log.error("could not enqueue job", extra={"job_id": job.id, "error": repr(error)})
        fail_unqueued(session, job.id, "queue-unavailable", "the job could not be enqueued")
        raise Problem(503, "queue-unavailable", "the job queue is unavailable; try again later",
                      "Service unavailable") from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    log.info("job created", extra={"job_id": job.id, "tenant_id": tenant.id, "method": job.method})
    return JobOut.of(job)


def _replay(session, tenant_id: str, key: str, request_hash: str, response: Response) -> JobOut | None:
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is None:
        return None
    if job.request_hash != request_hash:
        raise Problem(409, "idempotency-key-reused", "this Idempotency-Key was used with a different request body",
                      "Idempotency key reused", job_id=job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job)


def _check_eval_dataset(dataset_id: str, body: JobCreate, storage, settings) -> None:
    """Fail now, not an hour into training, if the holdout's folders are not the job's classes."""
    try:
        with storage.local_file(dataset_archive(dataset_id)) as path:
            open_labelled_images(path, class_names=body.class_names, limits=settings.data_limits())
    except DataError as error:
        raise Problem(422, error.code, f"eval dataset: {error.message}", "Unusable eval dataset") from None
    except ValueError as error:
        raise Problem(422, "invalid-class-names", str(error), "Invalid class names") from None


@router.get("", response_model=Page[JobOut])
def list_jobs(session: SessionDep, tenant: TenantDep, page: PageDep,
              status_filter: Annotated[JobStatusName | None, Query(alias="status")] = None) -> dict:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status_filter is not None:
        query = query.where(Job.status == JobStatus(status_filter))
    items, total = paginate(session, query, page, (Job.created_at.desc(), Job.id))
    return {"items": [JobOut.of(j) for j in items], "total": total, "limit": page.limit, "offset": page.offset}


def get_owned_job(session, tenant, job_id: str) -> Job:
    return get_owned(session, tenant, Job, job_id, "job")


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return JobOut.of(get_owned_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={409: {"description": "the job already succeeded or failed"}})
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    """A queued job is cancelled at once; a running one becomes `cancelling` and its worker stops
    within seconds, at whatever stage it is. Cancelling a cancelled job is a no-op."""
    get_owned_job(session, tenant, job_id)
    after = request_cancel(session, job_id)
    if after in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Problem(409, "job-finished", f"the job already {after.value}", "Job already finished")
    session.expire_all()
    return JobOut.of(get_owned_job(session, tenant, job_id))


@router.get("/{job_id}/predictions", response_model=Page[DatasetPrediction],
            responses={409: {"description": "the job has not succeeded"}})
def job_predictions_(job_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep,
                     page: PageDep) -> dict:
    """The adapted classifier's label for every image of the job's dataset, in archive path order."""
    job = get_owned_job(session, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED:
        raise Problem(409, "job-not-succeeded", f"the job is {job.status.value}; predictions exist once it succeeds",
                      "No predictions yet")
    with storage.open(job_predictions(job_id)) as handle:
        predictions = json.load(handle)
    return {"items": predictions[page.offset:page.offset + page.limit], "total": len(predictions),
            "limit": page.limit, "offset": page.offset}

"""Jobs: create (idempotently), watch, cancel, and read the predictions on the job's own images."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from app.api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.pagination import PageDep, newest_first
from app.api.schemas import DatasetPrediction, JobCreate, JobOut, JobStatusName, Page, WebhookDeliveryOut
from app.core import crud, webhooks
from app.core.models import Job, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={404: {"description": "dataset not found"}, 409: {"description": "Idempotency-Key reused "
                        "with a different body"}, 422: {"description": "invalid job (unknown-model, invalid-config, "
                        "unknown-class, validation-error)"}})
def create_job(body: JobCreate, request: Request, response: Response, session: SessionDep, tenant: TenantDep,
               settings: SettingsDep, storage: StorageDep,
               idempotency_key: Annotated[str | None, Header(max_length=200, description=(
                   "retrying with the same key returns the first job instead of creating another"))] = None) -> JobOut:
    """Start adapting a backbone to `class_names` on a dataset. Answers at once; poll the job."""
    job, replayed = crud.create_job(session, tenant.id, body.as_request(), settings=settings, storage=storage,
                                    celery=request.app.state.celery, idempotency_key=idempotency_key,
                                    request_hash=hashlib.sha256(body.model_dump_json(exclude_unset=True).encode()).hexdigest())
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.model_validate(job)


@router.get("", response_model=Page[JobOut])
def list_jobs(session: SessionDep, tenant: TenantDep, page: PageDep,
              status_filter: Annotated[JobStatusName | None, Query(alias="status")] = None) -> dict:
    where = [] if status_filter is None else [Job.status == JobStatus(status_filter)]
    return newest_first(session, Job, tenant.id, page, *where)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> Job:
    return crud.owned(session, tenant.id, Job, job_id, "job")


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={409: {"description": "the job already succeeded or failed"}})
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> Job:
    """A queued job is cancelled at once; a running one becomes `cancelling` and its worker stops
    within seconds, at whatever stage it is. Cancelling a cancelled job is a no-op."""
    return crud.cancel_job(session, tenant.id, job_id)


@router.get("/{job_id}/predictions", response_model=Page[DatasetPrediction],
            responses={409: {"description": "the job has not succeeded"}})
def job_predictions(job_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep,
                    page: PageDep) -> dict:
    """The adapted classifier's label for every image of the job's dataset, in archive path order."""
    predictions = crud.read_job_predictions(session, tenant.id, storage, job_id)
    return {"items": predictions[page.offset:page.offset + page.limit], "total": len(predictions),
            "limit": page.limit, "offset": page.offset}


@router.get("/{job_id}/predictions/export", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
                             "description": "every prediction: CSV `path,label,probability`, or one JSON object per line"},
                       409: {"description": "the job has not succeeded"}})
def export_job_predictions(job_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep,
                           format: Literal["csv", "jsonl"] = "csv") -> StreamingResponse:
    """All of the job's predictions as one file (what a prediction job is for)."""
    predictions = crud.read_job_predictions(session, tenant.id, storage, job_id)
    media_type = "text/csv" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(crud.job_predictions_rows(predictions, format), media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{job_id}-predictions.{format}"'})


@router.get("/{job_id}/webhooks", response_model=list[WebhookDeliveryOut])
def job_webhooks(job_id: str, session: SessionDep, tenant: TenantDep) -> list:
    """The events sent (or being sent) to the job's callback URL, oldest first, with each one's outcome."""
    crud.owned(session, tenant.id, Job, job_id, "job")
    return webhooks.deliveries(session, job_id)

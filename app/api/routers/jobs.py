"""Jobs: create (idempotently), watch, cancel, and read the predictions on the job's own images."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.pagination import PageDep, newest_first
from app.api.schemas import DatasetPrediction, JobCreate, JobOut, JobStatusName, Page, WebhookDeliveryOut
from app.core import crud, webhooks
from app.core.models import Job, JobStatus, Tenant
from app.core.storage import Storage

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


@dataclass
class PredictionFilter:
    """Which predictions to list: one set of what the method did, one class, a confidence range."""

    set: Annotated[crud.ReviewSet, Query(description=(
        "`all`; `s_star` (Phase I's training set); `clean_model1|2` (what the other model accepted of model "
        "i's labels: its Phase II set); `rejected_model1|2` (what it did not); `labelled` (the labels given "
        "to the job)"))] = "all"
    label: Annotated[str | None, Query(max_length=200, description=(
        "only this class, by the set's own label: zero-shot for `s_star`, model i's for its sets, the "
        "given label for `labelled`, the final prediction for `all`"))] = None
    min_probability: Annotated[float, Query(ge=0, le=1, description="final confidence at least")] = 0.0
    max_probability: Annotated[float, Query(ge=0, le=1, description="final confidence at most")] = 1.0

    def rows(self, request: Request, session: Session, tenant: Tenant, storage: Storage, job_id: str) -> list[dict]:
        predictions = crud.read_job_predictions(session, tenant.id, storage, job_id,
                                                cached=request.app.state.job_predictions.get)
        return crud.filter_predictions(predictions, self.set, self.label, self.min_probability, self.max_probability)


FilterDep = Annotated[PredictionFilter, Depends()]
_NOT_YET = {409: {"description": "the job has not succeeded (or `set` needs an adaptation job)"}}


# Fields a job does not have (top_k for an adaptation job, the review for a prediction job) are left
# out, as in the export's lines.
@router.get("/{job_id}/predictions", response_model=Page[DatasetPrediction], response_model_exclude_none=True,
            responses=_NOT_YET)
def job_predictions(job_id: str, request: Request, session: SessionDep, tenant: TenantDep, storage: StorageDep,
                    page: PageDep, where: FilterDep) -> dict:
    """The adapted classifier's label for every image of the job's dataset, in archive path order,
    with what the method did with each image (the dashboard's gallery pages through these)."""
    predictions = where.rows(request, session, tenant, storage, job_id)
    return {"items": predictions[page.offset:page.offset + page.limit], "total": len(predictions),
            "limit": page.limit, "offset": page.offset}


@router.get("/{job_id}/predictions/export", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}},
                             "description": "every prediction: CSV `path,label,probability`, or one JSON object per line"},
                       **_NOT_YET})
def export_job_predictions(job_id: str, request: Request, session: SessionDep, tenant: TenantDep,
                           storage: StorageDep, where: FilterDep,
                           format: Literal["csv", "jsonl"] = "csv") -> StreamingResponse:
    """The job's predictions (all, or those the filters keep) as one file (what a prediction job is for)."""
    predictions = where.rows(request, session, tenant, storage, job_id)
    media_type = "text/csv" if format == "csv" else "application/x-ndjson"
    return StreamingResponse(crud.job_predictions_rows(predictions, format), media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{job_id}-predictions.{format}"'})


@router.get("/{job_id}/webhooks", response_model=list[WebhookDeliveryOut])
def job_webhooks(job_id: str, session: SessionDep, tenant: TenantDep) -> list:
    """The events sent (or being sent) to the job's callback URL, oldest first, with each one's outcome."""
    crud.owned(session, tenant.id, Job, job_id, "job")
    return webhooks.deliveries(session, job_id)

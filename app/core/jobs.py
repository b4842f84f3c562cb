"""The job state machine. The row is the truth; every transition is one conditional UPDATE, so the
API, the worker and the sweeper can race without locks and exactly one of them wins.

    QUEUED -> RUNNING -> SUCCEEDED | FAILED
    QUEUED -> CANCELLED                       (nothing runs yet, so no one else has to acknowledge)
    QUEUED -> FAILED                          (the API could not enqueue it: nobody would ever run it)
    RUNNING -> CANCELLING -> CANCELLED        (the worker notices within a heartbeat and stops)
    RUNNING -> QUEUED                         (sweeper: heartbeat stale, attempts left; resumes from checkpoints)
    RUNNING -> FAILED                         (sweeper: heartbeat stale, attempt cap reached)
    QUEUED -> QUEUED                          (sweeper: queued too long, its message is sent again)
    CANCELLING -> CANCELLED                   (sweeper: the cancelling worker died)

`attempts` doubles as a fencing token: a worker only writes while the row still carries the attempt
it claimed, so a worker that was presumed dead (and replaced) cannot overwrite its successor.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core import webhooks
from app.core.models import Classifier, Job, JobStatus, utcnow


def _transition(session: Session, job_id: str, where: list, **values: Any) -> bool:
    now = utcnow()
    result = session.execute(update(Job).where(Job.id == job_id, *where).values(updated_at=now, **values)
                             .execution_options(synchronize_session=False))
    if result.rowcount == 1 and "status" in values:
        webhooks.record(session, job_id)  # in this transaction: the event exists if and only if the change does
    session.commit()
    return result.rowcount == 1


def status_of(session: Session, job_id: str) -> JobStatus | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def _finished(job_started: datetime | None, now: datetime) -> dict[str, Any]:
    return {"finished_at": now, "duration_s": (now - job_started).total_seconds() if job_started else None}


# --------------------------------------------------------------------------- API side


def request_cancel(session: Session, job_id: str) -> JobStatus | None:
    """QUEUED -> CANCELLED, or RUNNING -> CANCELLING; returns the status afterwards."""
    now = utcnow()
    if _transition(session, job_id, [Job.status == JobStatus.QUEUED], status=JobStatus.CANCELLED,
                   finished_at=now, stage=None):
        return JobStatus.CANCELLED
    _transition(session, job_id, [Job.status == JobStatus.RUNNING], status=JobStatus.CANCELLING)
    return status_of(session, job_id)


def fail_unqueued(session: Session, job_id: str, code: str, message: str) -> bool:
    return _transition(session, job_id, [Job.status == JobStatus.QUEUED], status=JobStatus.FAILED,
                       error_code=code, error_message=message, finished_at=utcnow())


# --------------------------------------------------------------------------- worker side


def claim(session: Session, job_id: str, worker: str) -> int | None:
    """QUEUED -> RUNNING; returns this attempt's number (the fencing token), or None if not ours."""
    now = utcnow()
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.QUEUED:
        return None
    attempt = job.attempts + 1
    won = _transition(session, job_id, [Job.status == JobStatus.QUEUED, Job.attempts == job.attempts],
                      status=JobStatus.RUNNING, attempts=attempt, heartbeat_at=now, worker=worker,
                      started_at=job.started_at or now, error_code=None, error_message=None)
    return attempt if won else None


def heartbeat(session: Session, job_id: str, attempt: int, **progress: Any) -> bool:
    """Record liveness (and progress); False once the job is no longer RUNNING for this attempt."""
    return _transition(session, job_id, [Job.status == JobStatus.RUNNING, Job.attempts == attempt],
                       heartbeat_at=utcnow(), **progress)


def succeed(session: Session, job_id: str, attempt: int, classifier: Classifier | None, metrics: dict) -> bool:
    """RUNNING -> SUCCEEDED together with the classifier row it made (none for a prediction job), in
    one transaction; False if the job was cancelled (or taken over) meanwhile: then nothing is written."""
    job = session.get(Job, job_id)
    now = utcnow()
    made = {}
    if classifier is not None:
        session.add(classifier)
        session.flush()
        made = {"classifier_id": classifier.id}
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
        .values(status=JobStatus.SUCCEEDED, metrics=metrics, progress=1.0, eta_s=0.0,
                heartbeat_at=now, updated_at=now, **made, **_finished(job.started_at, now))
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        session.rollback()
        return False
    webhooks.record(session, job_id)
    session.commit()
    return True


def fail(session: Session, job_id: str, attempt: int, code: str, message: str) -> JobStatus | None:
    """RUNNING -> FAILED. A failure while CANCELLING ends as CANCELLED: the user asked it to stop."""
    job = session.get(Job, job_id)
    now = utcnow()
    if not _transition(session, job_id, [Job.status == JobStatus.RUNNING, Job.attempts == attempt],
                       status=JobStatus.FAILED, error_code=code, error_message=message[:2000],
                       **_finished(job.started_at, now)):
        mark_cancelled(session, job_id, attempt)
    return status_of(session, job_id)


def mark_cancelled(session: Session, job_id: str, attempt: int | None = None) -> bool:
    """CANCELLING -> CANCELLED (by the worker that stopped, or by the sweeper when it died)."""
    job = session.get(Job, job_id)
    where = [Job.status == JobStatus.CANCELLING] + ([Job.attempts == attempt] if attempt is not None else [])
    return _transition(session, job_id, where, status=JobStatus.CANCELLED,
                       **_finished(job.started_at if job else None, utcnow()))


# --------------------------------------------------------------------------- sweeper side


@dataclass
class SweepResult:
    requeued: list[str]
    failed: list[str]
    cancelled: list[str]


def sweep_stale(session: Session, stale_after_s: float, max_attempts: int) -> SweepResult:
    """Jobs whose worker stopped heartbeating: re-queue (attempts left), fail (cap reached), or
    finish a cancellation. The caller enqueues the re-queued ids."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    result = SweepResult([], [], [])
    stale = session.execute(select(Job.id, Job.status, Job.attempts).where(
        Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLING]), Job.heartbeat_at < cutoff)).all()
    for job_id, job_status, attempts in stale:
        where = [Job.status == job_status, Job.attempts == attempts, Job.heartbeat_at < cutoff]
        if job_status == JobStatus.CANCELLING:
            if mark_cancelled(session, job_id, attempts):
                result.cancelled.append(job_id)
        elif attempts < max_attempts:
            if _transition(session, job_id, where, status=JobStatus.QUEUED, worker=None):
                result.requeued.append(job_id)
        elif _transition(session, job_id, where, status=JobStatus.FAILED, error_code="worker-lost",
                         error_message=f"the worker running this job stopped responding ({attempts} attempts)",
                         finished_at=utcnow()):
            result.failed.append(job_id)
    return result


def touch_long_queued(session: Session, queued_for_s: float) -> list[str]:
    """QUEUED jobs nobody has touched for `queued_for_s`: their broker message may be gone (Redis
    restarted without persistence, or the API died between commit and enqueue). Each one returned
    is touched in the same conditional UPDATE, so whichever sweeper wins sends it again, once per
    period. A duplicate message is harmless: `claim` lets only one worker run the job."""
    cutoff = utcnow() - timedelta(seconds=queued_for_s)
    waiting = session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED, Job.updated_at < cutoff)).all()
    return [job_id for job_id in waiting
            if _transition(session, job_id, [Job.status == JobStatus.QUEUED, Job.updated_at < cutoff])]

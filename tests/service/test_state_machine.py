"""The job state machine's transitions, against the real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from app.core.auth import get_or_create_tenant
from app.core.db import session_scope
from app.core.jobs import (claim, fail, fail_unqueued, heartbeat, mark_cancelled, request_cancel, succeed,
                      sweep_stale)
from app.core.models import Classifier, Job, JobStatus, utcnow


def new_job(url: str) -> str:
    with session_scope(url) as session:
        tenant = get_or_create_tenant(session, "state-machine")
        job = Job(tenant_id=tenant.id, dataset_id=None, class_names=["a", "b"], method="coft",
                  backbone_model="tiny", config={})
        session.add(job)
        session.flush()
        return job.id


def status(url: str, job_id: str) -> Job:
    with session_scope(url) as session:
        return session.get(Job, job_id)


def age_heartbeat(url: str, job_id: str, seconds: float) -> None:
    with session_scope(url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_claim_is_exclusive_and_fenced(stack):
    url = stack.database_url
    job_id = new_job(url)
    with session_scope(url) as session:
        assert claim(session, job_id, "w1") == 1
        assert claim(session, job_id, "w2") is None  # a duplicate message: not ours
        assert heartbeat(session, job_id, 1, stage="zero-shot", progress=0.1)
        assert not heartbeat(session, job_id, 2)  # a stale attempt cannot write
    job = status(url, job_id)
    assert job.status == JobStatus.RUNNING and job.stage == "zero-shot" and job.started_at is not None


def test_cancel_queued_is_immediate_and_final(stack):
    url = stack.database_url
    job_id = new_job(url)
    with session_scope(url) as session:
        assert request_cancel(session, job_id) == JobStatus.CANCELLED
        assert claim(session, job_id, "w1") is None
        assert request_cancel(session, job_id) == JobStatus.CANCELLED


def test_cancel_running_goes_through_cancelling(stack):
    url = stack.database_url
    job_id = new_job(url)
    with session_scope(url) as session:
        claim(session, job_id, "w1")
        assert request_cancel(session, job_id) == JobStatus.CANCELLING
        assert not heartbeat(session, job_id, 1)  # the worker learns it must stop
        classifier = Classifier(tenant_id=status(url, job_id).tenant_id, job_id=job_id, class_names=["a", "b"],
                                method="coft", backbone_model="tiny", num_members=2, size_bytes=1,
                                artifact_key="classifiers/x/1")
        assert not succeed(session, job_id, 1, classifier, {})  # too late to succeed
        assert mark_cancelled(session, job_id, 1)
    job = status(url, job_id)
    assert job.status == JobStatus.CANCELLED and job.classifier_id is None and job.finished_at is not None


def test_succeed_and_fail_are_terminal(stack):
    url = stack.database_url
    ok, bad = new_job(url), new_job(url)
    with session_scope(url) as session:
        claim(session, ok, "w1")
        tenant_id = status(url, ok).tenant_id
        assert succeed(session, ok, 1, Classifier(tenant_id=tenant_id, job_id=ok, class_names=["a", "b"],
                                                  method="coft", backbone_model="tiny", num_members=2, size_bytes=1,
                                                  artifact_key="classifiers/x/1"),
                       {"agreement": 0.9})
        assert request_cancel(session, ok) == JobStatus.SUCCEEDED
        claim(session, bad, "w1")
        assert fail(session, bad, 1, "adaptation-failed", "boom") == JobStatus.FAILED
        assert request_cancel(session, bad) == JobStatus.FAILED
    done = status(url, ok)
    assert done.status == JobStatus.SUCCEEDED and done.classifier_id and done.duration_s >= 0
    assert done.metrics == {"agreement": 0.9}
    assert status(url, bad).error_code == "adaptation-failed"


def test_failure_while_cancelling_ends_cancelled(stack):
    url = stack.database_url
    job_id = new_job(url)
    with session_scope(url) as session:
        claim(session, job_id, "w1")
        request_cancel(session, job_id)
        assert fail(session, job_id, 1, "adaptation-failed", "boom") == JobStatus.CANCELLED


def test_unqueued_job_fails(stack):
    url = stack.database_url
    job_id = new_job(url)
    with session_scope(url) as session:
        assert fail_unqueued(session, job_id, "queue-unavailable", "no broker")
    assert status(url, job_id).status == JobStatus.FAILED


def test_sweeper_requeues_stale_jobs_until_the_attempt_cap(stack):
    url = stack.database_url
    job_id = new_job(url)
    with session_scope(url) as session:
        claim(session, job_id, "w1")
        assert sweep_stale(session, 60, max_attempts=2).requeued == []  # fresh heartbeat: left alone
    age_heartbeat(url, job_id, 120)
    with session_scope(url) as session:
        assert sweep_stale(session, 60, max_attempts=2).requeued == [job_id]
        assert status(url, job_id).status == JobStatus.QUEUED
        assert not heartbeat(session, job_id, 1)  # the presumed-dead attempt is fenced off
        assert claim(session, job_id, "w2") == 2
    age_heartbeat(url, job_id, 120)
    with session_scope(url) as session:
        assert sweep_stale(session, 60, max_attempts=2).failed == [job_id]
    job = status(url, job_id)
    assert job.status == JobStatus.FAILED and job.error_code == "worker-lost" and job.attempts == 2


def test_sweeper_finishes_orphaned_cancellations(stack):
    url = stack.database_url
    job_id = new_job(url)
    with session_scope(url) as session:
        claim(session, job_id, "w1")
        request_cancel(session, job_id)
    age_heartbeat(url, job_id, 120)
    with session_scope(url) as session:
        assert sweep_stale(session, 60, max_attempts=3).cancelled == [job_id]
    assert status(url, job_id).status == JobStatus.CANCELLED


def test_long_queued_jobs_are_handed_out_for_resending_once_per_period(stack):
    from app.core.jobs import touch_long_queued

    url = stack.database_url
    waiting, running = new_job(url), new_job(url)
    with session_scope(url) as session:
        claim(session, running, "w1")
        assert waiting not in touch_long_queued(session, 60)  # queued just now: its message is on its way
        session.execute(update(Job).where(Job.id.in_([waiting, running]))
                        .values(updated_at=utcnow() - timedelta(seconds=120)))
        session.commit()
        handed_out = touch_long_queued(session, 60)  # (other tests' jobs may be in this database too)
        assert waiting in handed_out and running not in handed_out
        assert waiting not in touch_long_queued(session, 60)  # touched: the next sweeper leaves it for a period
    assert status(url, waiting).status == JobStatus.QUEUED

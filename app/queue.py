"""The Celery app as both sides see it. The API only publishes (a job id, nothing else); the
worker adds its execution settings in worker/celery_app.py on top of this one configuration."""

from __future__ import annotations

from celery import Celery

from app.settings import Settings

TASK_NAME = "coft.run_job"
QUEUE = "coft-jobs"
# How long Redis waits for an ack before handing an unacked message to another worker. With late
# acks a running job's message stays unacked for the whole run, so this must outlast the longest
# job or a second worker would start it while the first still runs.
VISIBILITY_MARGIN_S = 3600


def make_celery(settings: Settings) -> Celery:
    celery = Celery("coft", broker=settings.broker_url)
    hard_limit = settings.job_time_limit_s
    celery.conf.update(
        task_default_queue=QUEUE,
        task_ignore_result=True,  # results live in the job row, not in a result backend
        task_acks_late=True,  # a message is acked when the job ends, so a dead worker's job is redelivered
        task_reject_on_worker_lost=False,  # ...but the sweeper decides about retries (attempt cap), not Redis
        worker_prefetch_multiplier=1,  # never hold a second job while one runs
        task_time_limit=hard_limit,
        task_soft_time_limit=max(hard_limit - 60, 1),  # SoftTimeLimitExceeded lets the job record why
        broker_transport_options={"visibility_timeout": hard_limit + VISIBILITY_MARGIN_S},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
    )
    assert celery.conf.broker_transport_options["visibility_timeout"] > celery.conf.task_time_limit
    return celery


def enqueue_job(celery: Celery | None, job_id: str) -> None:
    if celery is None:
        raise RuntimeError("no broker configured (REDIS_URL)")
    celery.send_task(TASK_NAME, args=[job_id], retry=True,
                     retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1})

"""The Celery app, configured from the settings in this one place. The API only publishes (a job id,
nothing else); `make_celery(settings, worker=True)` adds how a worker runs jobs."""

from __future__ import annotations

from celery import Celery

from app.core.settings import Settings

TASK_NAME = "coft.run_job"
QUEUE = "coft-jobs"
# How long Redis waits for an ack before handing an unacked message to another worker. With late
# acks a running job's message stays unacked for the whole run, so this must outlast the longest
# job or a second worker would start it while the first still runs.
VISIBILITY_MARGIN_S = 3600


def make_celery(settings: Settings, worker: bool = False) -> Celery:
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
    if worker:
        # One job at a time per worker process, for one GPU, and a fresh child process per job so that
        # every job starts with clean GPU memory.
        celery.conf.update(
            include=["worker.tasks"],
            worker_concurrency=1,
            worker_pool="prefork",
            worker_max_tasks_per_child=1,
            worker_hijack_root_logger=False,
            worker_send_task_events=False,
        )
    return celery


def enqueue_job(celery: Celery | None, job_id: str) -> None:
    if celery is None:
        raise RuntimeError("no broker configured (REDIS_URL)")
    celery.send_task(TASK_NAME, args=[job_id], retry=True,
                     retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1})

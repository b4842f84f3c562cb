"""Runs in each worker's main process: re-queues jobs whose worker died, re-sends jobs whose queue
message was lost, and announces the worker.

Every worker sweeps; that is safe because each re-queue is a conditional UPDATE that only one
sweeper can win, and it saves running a separate scheduler (celery beat) process.

The sweeper is a thread of the process that forks every job's process. A fork copies the memory of
all threads but runs only the forking one: a child forked while the sweeper was inside SQLite (or
any library holding a process-wide mutex) inherits that mutex held by a thread that no longer
exists, and hangs on its first connect, with the worker's only slot. So a tick holds `fork_guard`,
and every fork in this process waits for it (os.register_at_fork).
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery

from app.core.db import session_scope
from app.core.jobs import sweep_stale, touch_long_queued
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.core.workers import KEY_PREFIX, announce, redis_client

log = logging.getLogger("worker.sweeper")

fork_guard = threading.Lock()
os.register_at_fork(before=fork_guard.acquire, after_in_parent=fork_guard.release,
                    after_in_child=fork_guard.release)


class Sweeper(threading.Thread):
    def __init__(self, settings: Settings, celery: Celery, hostname: str):
        super().__init__(name="coft-sweeper", daemon=True)
        self.settings, self.celery, self.hostname = settings, celery, hostname
        self._stopping = threading.Event()
        self._redis = redis_client(settings)

    def run(self) -> None:
        while True:
            self.tick()
            if self._stopping.wait(self.settings.sweep_interval_s):
                break

    def stop(self) -> None:
        self._stopping.set()
        self.join(5)
        try:
            self._redis.delete(KEY_PREFIX + self.hostname)
        except Exception:  # noqa: BLE001 - shutting down anyway; the key expires by itself
            pass

    def tick(self) -> None:
        with fork_guard:
            self._sweep()

    def _sweep(self) -> None:
        try:
            import torch  # already imported by worker.tasks; asking does not initialise CUDA

            announce(self._redis, self.hostname, {"pid": os.getpid(), "cuda_initialized": torch.cuda.is_initialized()},
                     ttl_s=max(3 * self.settings.sweep_interval_s, 5.0))
        except Exception:  # noqa: BLE001 - Redis down: /readyz will say so; keep sweeping
            log.warning("could not announce the worker in Redis", exc_info=True)
        try:
            with session_scope(self.settings.database_url) as session:
                result = sweep_stale(session, self.settings.heartbeat_stale_s, self.settings.max_attempts)
                resend = touch_long_queued(session, self.settings.queued_resend_s)
            for job_id in result.requeued:
                enqueue_job(self.celery, job_id)
            for kind in ("requeued", "failed", "cancelled"):
                for job_id in getattr(result, kind):
                    log.warning(f"stale job {kind}", extra={"job_id": job_id})
            for job_id in resend:
                enqueue_job(self.celery, job_id)
                log.warning("long-queued job sent again", extra={"job_id": job_id})
        except Exception:  # noqa: BLE001 - a database hiccup must not kill the sweeper thread
            log.exception("sweep failed")

"""The worker's Celery app: `python -m worker` (or `celery -A worker.celery_app worker`).

One job at a time per worker process, for one GPU: concurrency 1, prefetch 1, late acks, and a
fresh child process per job (all configured in app.core.queue). The parent process imports torch and coft (children fork fast) but never
touches CUDA: a CUDA context does not survive fork. It runs the sweeper and announces itself
in Redis for /readyz.
"""

from __future__ import annotations

import logging
import socket

from celery import signals

from app.core.db import get_engine
from app.core.logs import configure_logging
from app.core.queue import make_celery
from app.core.settings import get_settings
from worker.sweeper import Sweeper

settings = get_settings()
celery_app = make_celery(settings, worker=True)
log = logging.getLogger("worker")
_sweeper: Sweeper | None = None


@signals.setup_logging.connect
def _logging(**_) -> None:
    configure_logging(settings.log_level, settings.log_json)


@signals.worker_process_init.connect
def _child_started(**_) -> None:
    # Pooled DB connections were opened by the parent (sweeper); a forked child must not share them.
    get_engine(settings.database_url).dispose(close=False)


@signals.worker_ready.connect
def _ready(sender=None, **_) -> None:
    global _sweeper
    hostname = getattr(sender, "hostname", None) or socket.gethostname()
    _sweeper = Sweeper(settings, celery_app, hostname)
    _sweeper.start()
    log.info("worker ready", extra={"hostname": hostname})


@signals.worker_shutdown.connect
def _shutdown(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()

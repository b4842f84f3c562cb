"""`python -m worker [--hostname NAME@%h]`: one Celery worker with the settings this service needs."""

from __future__ import annotations

import sys

from worker.celery_app import celery_app, settings


def main(argv: list[str]) -> None:
    # Everything else is configured in app.core.queue; these switch off worker bootsteps, which only the
    # command line can: workers coordinate through the job rows, not through Celery's gossip.
    celery_app.worker_main(["worker", f"--loglevel={settings.log_level}", "--without-gossip", "--without-mingle",
                            "--without-heartbeat", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])

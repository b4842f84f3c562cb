"""`python -m worker [--hostname NAME@%h]`: one Celery worker with the settings this service needs."""

from __future__ import annotations

import sys

from worker.celery_app import celery_app


def main(argv: list[str]) -> None:
    celery_app.worker_main(["worker", "--loglevel=INFO", "--concurrency=1", "--pool=prefork",
                            # No gossip/mingle/events: workers coordinate through the job rows, not Celery.
                            "--without-gossip", "--without-mingle", "--without-heartbeat", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])

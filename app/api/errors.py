"""Every error the API returns is RFC 9457 problem+json.

Type URIs: `https://coft.dev/problems/<slug>`. The slug is the stable, machine-readable part;
clients switch on it (or on the whole URI), never on `title` or `detail`, which are for humans.
Archive problems reuse coft.data's DataError codes as slugs (`path-traversal`, `zip-bomb`...),
so the API and the library name a problem the same way. The slugs in use are listed in
docs/service.md; a new slug is an API addition, renaming one is a breaking change.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import Conflict, Invalid, NotFound, OverQuota, ServiceError, Unavailable

PROBLEM_BASE = "https://coft.dev/problems/"
PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("app.errors")


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(self, status: int, slug: str, detail: str, title: str | None = None,
                 headers: dict[str, str] | None = None, **extensions: Any):
        super().__init__(detail)
        self.status, self.slug, self.detail = status, slug, detail
        self.title = title or slug.replace("-", " ").capitalize()
        self.headers = headers or {}
        self.extensions = extensions


# What each kind of core error answers.
_CORE_STATUS = {Invalid: 422, NotFound: 404, Conflict: 409, OverQuota: 413, Unavailable: 503}


def problem_response(status: int, slug: str, title: str, detail: str, instance: str | None = None,
                     headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extensions)
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


# Problems Starlette/FastAPI raise themselves (unknown route, wrong method, body too large).
_HTTP_SLUGS = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large", 400: "bad-request",
               401: "unauthorized", 415: "unsupported-media-type"}


# Request fields with a problem type of their own, so clients need not parse `errors` to tell a bad
# class list from any other schema mismatch.
_FIELD_SLUGS = {"class_names": "invalid-class-names", "template": "invalid-template", "config": "invalid-config"}


def _validation_slug(errors: list[dict[str, Any]]) -> str:
    fields = {tuple(e["loc"][:2]) for e in errors}
    if len(fields) == 1 and (field := fields.pop())[0] == "body" and len(field) == 2:
        return _FIELD_SLUGS.get(str(field[1]), "validation-error")
    return "validation-error"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.slug, exc.title, exc.detail, request.url.path, exc.headers,
                                **exc.extensions)

    @app.exception_handler(ServiceError)
    async def _core(request: Request, exc: ServiceError) -> JSONResponse:
        status = next(code for kind, code in _CORE_STATUS.items() if isinstance(exc, kind))
        return problem_response(status, exc.slug, exc.title, exc.detail, request.url.path, **exc.extensions)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:5])
        return problem_response(422, _validation_slug(errors), "Invalid request", detail, request.url.path,
                                errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = _HTTP_SLUGS.get(exc.status_code, f"http-{exc.status_code}")
        title = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else slug
        detail = exc.detail if isinstance(exc.detail, str) else title
        return problem_response(exc.status_code, slug, title, detail, request.url.path, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug: logged with its traceback, answered without internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal-error", "Internal server error",
                                "an unexpected error occurred; it has been logged", request.url.path)


PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "description": "https://coft.dev/problems/<slug>: switch on this"},
        "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "additionalProperties": True,  # extension members: errors, rejected, checks, jobs, retry_after_s
}


def document_problems(app: FastAPI, gated: Callable[[str, str], bool], schemas: dict | None = None) -> None:
    """Make the OpenAPI document say what the API really answers on errors: every 4xx/5xx is
    problem+json (FastAPI would document its own 422 body, which we never send); /v1 routes can
    answer 401; file routes (`gated`) can answer 413 and 429."""
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Problem"] = PROBLEM_SCHEMA
        components.update(schemas or {})  # bodies routes read themselves (openapi_extra)
        for path, item in schema["paths"].items():
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                if path.startswith("/v1/"):
                    responses.setdefault("401", {"description": "no API key, or an unknown one"})
                if gated(method.upper(), path):
                    responses.setdefault("413", {"description": "body over the configured size limit"})
                    responses.setdefault("429", {"description": "over the tenant's rate limit", "headers": {
                        "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}})
                for code, response in responses.items():
                    if code[0] in "45":
                        response["content"] = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


class BodySizeLimit:
    """Pure ASGI: refuse request bodies over a per-route limit, as problem+json.

    A declared Content-Length over the limit is answered at once, before anything is read; a
    chunked body is counted as it streams and stopped when it crosses the limit. (Starlette's own
    limiter answers in text/plain, which would break the one-error-format rule.)
    """

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = problem_response(413, "payload-too-large", "Payload too large",
                                        f"the request body exceeds {limit} bytes", scope["path"])
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # An HTTPException, so FastAPI's body parsing passes it on to our handler unchanged.
                raise StarletteHTTPException(413, f"the request body exceeds {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

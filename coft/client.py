"""A Python client for the coft service: every route, sync (`Client`) and async (`AsyncClient`), on httpx.

    from coft.client import Client

    with Client("http://localhost:8000", api_key="coft_...") as coft:
        dataset = coft.upload_dataset("photos.zip")
        job = coft.wait(coft.create_job(dataset.id, ["cat", "dog"], method="coft").id)  # a progress bar
        print(coft.predict(job.classifier_id, ["new.jpg"])[0].label)

Answers are typed (pydantic models of the service's JSON). A problem+json error is raised as the
`CoftError` subclass of its status (`NotFound`, `Invalid`, `Conflict`, ...), carrying its slug,
detail and extra members. 429 and 503 answers are retried with exponential backoff, waiting at least
what `Retry-After` asks; job creation sends an Idempotency-Key, so a retried request never makes two
jobs. Both clients share one definition of each route (`_Routes`); only sending differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict

T = TypeVar("T")
ImageInput = str | Path | bytes


# --------------------------------------------------------------------------- answers


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")  # a newer service may say more


class Dataset(_Answer):
    id: str
    filename: str
    status: str
    num_images: int
    num_rejected: int
    num_parts: int = 0
    size_bytes: int
    error: str | None = None
    rejected: list[dict[str, str]] = []


class Job(_Answer):
    id: str
    status: str
    stage: str | None = None
    progress: float = 0.0
    eta_s: float | None = None
    method: str
    metrics: dict[str, Any] = {}
    error: dict[str, Any] | None = None
    classifier_id: str | None = None
    dataset_id: str | None = None
    class_names: list[str] = []
    parent_job_id: str | None = None
    labels: dict[str, str] | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class ClassifierInfo(_Answer):
    id: str
    job_id: str | None = None
    class_names: list[str]
    method: str
    num_members: int


class LabelProbability(_Answer):
    label: str
    probability: float


class ImagePrediction(_Answer):
    filename: str
    label: str
    probability: float
    top_k: list[LabelProbability] = []


class DatasetPrediction(_Answer):
    index: int | None = None
    name: str
    label: str
    probability: float
    top_k: list[LabelProbability] | None = None
    # adaptation jobs: what the method did with the image
    zero_shot_label: str | None = None
    s_star: bool | None = None
    model_labels: list[str] | None = None
    clean: list[bool] | None = None
    given_label: str | None = None


class WebhookDelivery(_Answer):
    id: str
    event: str
    status: str
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None


class Alias(_Answer):
    name: str
    classifier_id: str


class Page(_Answer, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


# --------------------------------------------------------------------------- errors


class CoftError(Exception):
    """A problem+json answer (RFC 9457): `slug` is the last part of its `type`."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status, self.problem = status, problem
        self.slug = str(problem.get("type", "")).rsplit("/", 1)[-1] or f"http-{status}"
        self.detail = problem.get("detail") or problem.get("title") or ""
        super().__init__(f"{status} {self.slug}: {self.detail}")


class Unauthorized(CoftError): ...
class NotFound(CoftError): ...
class Conflict(CoftError): ...
class TooLarge(CoftError): ...
class Invalid(CoftError): ...
class RateLimited(CoftError): ...
class Unavailable(CoftError): ...


ERRORS: dict[int, type[CoftError]] = {401: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge, 422: Invalid,
                                      429: RateLimited, 503: Unavailable}
RETRIED = (429, 503)


def _raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {"title": response.text[:500]}
    raise ERRORS.get(response.status_code, CoftError)(response.status_code, problem if isinstance(problem, dict) else {})


def _retry_delay(response: httpx.Response, attempt: int, backoff_s: float) -> float:
    """Exponential backoff with jitter, and never less than the server's Retry-After."""
    delay = backoff_s * 2 ** attempt * (1 + random.random() / 4)
    try:
        return max(delay, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return delay


# --------------------------------------------------------------------------- routes


@dataclass
class _Call(Generic[T]):
    """One request and how to read its answer: what both clients send."""
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    files: Callable[[], Any] | None = None  # a fresh body per attempt, so a retry re-sends it whole
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _model(kind: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: kind.model_validate(response.json())


def _models(kind: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda response: [kind.model_validate(item) for item in response.json()]


def _nothing(response: httpx.Response) -> None:
    return None


def _image_files(images: list[ImageInput]) -> Callable[[], list]:
    def build() -> list:
        return [("images", (Path(image).name, Path(image).read_bytes()) if not isinstance(image, bytes)
                 else (f"image-{i}", image)) for i, image in enumerate(images)]
    return build


def _archive(source: ImageInput, filename: str | None) -> Callable[[], dict]:
    def build() -> dict:
        if isinstance(source, bytes):
            return {"file": (filename or "images.zip", source)}
        return {"file": (filename or Path(source).name, Path(source).read_bytes())}
    return build


class _Routes:
    """Every route of the service, once. `_call` sends (sync) or returns a coroutine (async)."""

    def _call(self, call: _Call[T]) -> T:
        raise NotImplementedError

    # datasets
    def upload_dataset(self, archive: ImageInput, filename: str | None = None) -> Dataset:
        """A zip or tar(.gz) of images (a path or bytes); a large one answers `validating`: see wait_dataset."""
        return self._call(_Call("POST", "/v1/datasets", _model(Dataset), files=_archive(archive, filename)))

    def create_upload(self, filename: str | None = None) -> Dataset:
        return self._call(_Call("POST", "/v1/datasets/uploads", _model(Dataset), json={"filename": filename}))

    def append_part(self, dataset_id: str, archive: ImageInput) -> Dataset:
        return self._call(_Call("POST", f"/v1/datasets/{dataset_id}/parts", _model(Dataset),
                                files=_archive(archive, None)))

    def finalize_upload(self, dataset_id: str) -> Dataset:
        return self._call(_Call("POST", f"/v1/datasets/{dataset_id}/finalize", _model(Dataset)))

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._call(_Call("GET", f"/v1/datasets/{dataset_id}", _model(Dataset)))

    def list_datasets(self, limit: int = 50, offset: int = 0) -> Page[Dataset]:
        return self._call(_Call("GET", "/v1/datasets", _model(Page[Dataset]), params={"limit": limit, "offset": offset}))

    def delete_dataset(self, dataset_id: str) -> None:
        return self._call(_Call("DELETE", f"/v1/datasets/{dataset_id}", _nothing))

    # jobs
    def create_job(self, dataset_id: str, class_names: list[str], method: Literal["zero-shot", "coft", "coft+"] = "coft",
                   *, model: str | None = None, pretrained: str | None = None, template: str | None = None,
                   config: dict[str, Any] | None = None, eval_dataset_id: str | None = None,
                   class_descriptions: dict[str, list[str]] | None = None,
                   idempotency_key: str | None = None) -> Job:
        body: dict[str, Any] = {"dataset_id": dataset_id, "class_names": class_names, "method": method}
        if model or pretrained:
            body["backbone"] = {"model": model, "pretrained": pretrained}
        optional = {"template": template, "config": config, "eval_dataset_id": eval_dataset_id,
                    "class_descriptions": class_descriptions}
        body.update({key: value for key, value in optional.items() if value is not None})
        return self._call(_Call("POST", "/v1/jobs", _model(Job), json=body,
                                headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex}))

    def get_job(self, job_id: str) -> Job:
        return self._call(_Call("GET", f"/v1/jobs/{job_id}", _model(Job)))

    def list_jobs(self, status: str | None = None, limit: int = 50, offset: int = 0) -> Page[Job]:
        params = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return self._call(_Call("GET", "/v1/jobs", _model(Page[Job]), params=params))

    def cancel_job(self, job_id: str) -> Job:
        return self._call(_Call("POST", f"/v1/jobs/{job_id}/cancel", _model(Job)))

    def job_predictions(self, job_id: str, limit: int = 50, offset: int = 0, *, set: str = "all",
                        label: str | None = None, min_probability: float = 0.0,
                        max_probability: float = 1.0) -> Page[DatasetPrediction]:
        """A page of the job's predictions; `set` ("s_star", "clean_model1", "rejected_model2", ...),
        `label` and the confidence range filter them (see the API's GET /v1/jobs/{id}/predictions)."""
        return self._call(_Call("GET", f"/v1/jobs/{job_id}/predictions", _model(Page[DatasetPrediction]), params={
            "limit": limit, "offset": offset, **_filters(set, label, min_probability, max_probability)}))

    def export_job_predictions(self, job_id: str, format: Literal["csv", "jsonl"] = "csv", *, set: str = "all",
                               label: str | None = None, min_probability: float = 0.0,
                               max_probability: float = 1.0) -> bytes:
        return self._call(_Call("GET", f"/v1/jobs/{job_id}/predictions/export", lambda r: r.content, params={
            "format": format, **_filters(set, label, min_probability, max_probability)}))

    def job_webhooks(self, job_id: str) -> list[WebhookDelivery]:
        return self._call(_Call("GET", f"/v1/jobs/{job_id}/webhooks", _models(WebhookDelivery)))

    def thumbnail(self, dataset_id: str, index: int, size: int = 128) -> bytes:
        """A JPEG of image `index` of the dataset (a prediction's `index`), at most `size` pixels."""
        return self._call(_Call("GET", f"/v1/datasets/{dataset_id}/images/{index}/thumbnail", lambda r: r.content,
                                params={"size": size}))

    # classifiers (an alias works wherever a classifier id does, but delete)
    def get_classifier(self, classifier: str) -> ClassifierInfo:
        return self._call(_Call("GET", f"/v1/classifiers/{classifier}", _model(ClassifierInfo)))

    def list_classifiers(self, limit: int = 50, offset: int = 0) -> Page[ClassifierInfo]:
        return self._call(_Call("GET", "/v1/classifiers", _model(Page[ClassifierInfo]),
                                params={"limit": limit, "offset": offset}))

    def delete_classifier(self, classifier_id: str) -> None:
        return self._call(_Call("DELETE", f"/v1/classifiers/{classifier_id}", _nothing))

    def predict(self, classifier: str, images: list[ImageInput], top_k: int = 5) -> list[ImagePrediction]:
        return self._call(_Call("POST", f"/v1/classifiers/{classifier}/predict",
                                lambda r: [ImagePrediction.model_validate(p) for p in r.json()["predictions"]],
                                params={"top_k": top_k}, files=_image_files(images)))

    def predict_dataset(self, classifier: str, dataset_id: str, top_k: int = 5) -> Job:
        """A prediction job over a stored dataset: wait() for it, then job_predictions / export_job_predictions."""
        return self._call(_Call("POST", f"/v1/classifiers/{classifier}/predictions", _model(Job),
                                json={"dataset_id": dataset_id, "top_k": top_k}))

    def export_classifier(self, classifier: str, format: Literal["tar.gz", "zip"] = "tar.gz") -> bytes:
        return self._call(_Call("GET", f"/v1/classifiers/{classifier}/export", lambda r: r.content,
                                params={"format": format}))

    # aliases
    def set_alias(self, name: str, classifier_id: str) -> Alias:
        return self._call(_Call("PUT", f"/v1/aliases/{name}", _model(Alias), json={"classifier_id": classifier_id}))

    def get_alias(self, name: str) -> Alias:
        return self._call(_Call("GET", f"/v1/aliases/{name}", _model(Alias)))

    def list_aliases(self) -> list[Alias]:
        return self._call(_Call("GET", "/v1/aliases", _models(Alias)))

    def delete_alias(self, name: str) -> None:
        return self._call(_Call("DELETE", f"/v1/aliases/{name}", _nothing))

    # zero-shot and models
    def zero_shot_predict(self, images: list[ImageInput], class_names: list[str], *, model: str | None = None,
                          pretrained: str | None = None, template: str | None = None,
                          top_k: int = 5) -> list[ImagePrediction]:
        form = {"class_names": class_names, **{k: v for k, v in
                                               {"model": model, "pretrained": pretrained, "template": template}.items()
                                               if v is not None}}
        return self._call(_Call("POST", "/v1/zero-shot/predict",
                                lambda r: [ImagePrediction.model_validate(p) for p in r.json()["predictions"]],
                                params={"top_k": top_k}, files=_image_files(images), data=form))

    def list_models(self) -> list[dict[str, Any]]:
        return self._call(_Call("GET", "/v1/models", lambda r: r.json()))


def _filters(set: str, label: str | None, min_probability: float, max_probability: float) -> dict[str, Any]:
    chosen = {"set": set, "label": label, "min_probability": min_probability, "max_probability": max_probability}
    return {name: value for name, value in chosen.items() if value is not None}


def _request_args(call: _Call) -> dict[str, Any]:
    return {"params": call.params, "json": call.json, "files": call.files() if call.files else None,
            "data": call.data, "headers": call.headers}


def _progress_bar(job_id: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"{job_id} [bold]{{task.fields[stage]}}"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn())


class Client(_Routes):
    """Synchronous: `with Client(url, api_key) as coft: ...`."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 60.0, retries: int = 5,
                 backoff_s: float = 0.5, http: httpx.Client | None = None):
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.retries, self.backoff_s = retries, backoff_s

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, call: _Call[T]) -> T:
        for attempt in range(self.retries + 1):
            response = self.http.request(call.method, call.path, **_request_args(call))
            if response.status_code not in RETRIED or attempt == self.retries:
                break
            time.sleep(_retry_delay(response, attempt, self.backoff_s))
        _raise_for_problem(response)
        return call.parse(response)

    def wait(self, job_id: str, *, progress: bool = True, poll_s: float = 1.0, timeout_s: float | None = None) -> Job:
        """Poll until the job ends (a progress bar with stage and ETA unless progress=False); the final job."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        bar = _progress_bar(job_id) if progress else None
        task = bar.add_task("job", total=1.0, stage="queued") if bar else None
        with bar or contextlib.nullcontext():
            while True:
                job = self.get_job(job_id)
                if bar is not None:
                    bar.update(task, completed=job.progress, stage=job.stage or job.status)
                if job.finished or (deadline is not None and time.monotonic() > deadline):
                    return job
                time.sleep(poll_s)

    def wait_dataset(self, dataset_id: str, *, poll_s: float = 0.5, timeout_s: float = 3600) -> Dataset:
        deadline = time.monotonic() + timeout_s
        while (dataset := self.get_dataset(dataset_id)).status in ("validating",) and time.monotonic() < deadline:
            time.sleep(poll_s)
        return dataset


class AsyncClient(_Routes):
    """Asynchronous: `async with AsyncClient(url, api_key) as coft: await coft.get_job(...)`."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 60.0, retries: int = 5,
                 backoff_s: float = 0.5, http: httpx.AsyncClient | None = None):
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self.http.headers["Authorization"] = f"Bearer {api_key}"
        self.retries, self.backoff_s = retries, backoff_s

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        for attempt in range(self.retries + 1):
            response = await self.http.request(call.method, call.path, **_request_args(call))
            if response.status_code not in RETRIED or attempt == self.retries:
                break
            await asyncio.sleep(_retry_delay(response, attempt, self.backoff_s))
        _raise_for_problem(response)
        return call.parse(response)

    def _call(self, call: _Call[T]) -> T:
        return self._send(call)  # type: ignore[return-value]  # a coroutine of T: await it

    async def wait(self, job_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None) -> Job:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = await self.get_job(job_id)
            if job.finished or (deadline is not None and time.monotonic() > deadline):
                return job
            await asyncio.sleep(poll_s)

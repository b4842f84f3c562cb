"""What the API does to a tenant's rows, out of the routers: upload a dataset, create a job
(idempotently), cancel it, delete things. Every function takes the tenant's id and answers
another tenant's id exactly like an unknown one (NotFound).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from celery import Celery
from sqlalchemy import Connection, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coft import Classifier as LoadedClassifier
from coft import (ArchiveIndex, CoFTConfig, DataError, DataLimits, ImageSet, check_job, export_onnx, open_images,
                  open_labelled_images)
from app.core import backbones, webhooks
from app.core.db import session_scope
from app.core.errors import Conflict, Invalid, OverQuota, Unavailable, not_found
from app.core.jobs import fail_unqueued, request_cancel
from app.core.models import Classifier, ClassifierAlias, Dataset, DatasetStatus, Job, JobStatus, new_id, utcnow
from app.core.queue import enqueue_job
from app.core.settings import Settings
from app.core.storage import (Storage, classifier_dir, dataset_archive, dataset_dir, dataset_parts,
                              job_predictions, new_part_key, onnx_export_key)

MAX_REJECTED_STORED = 1000
log = logging.getLogger("app.core")
Row = TypeVar("Row")


def owned(session: Session, tenant_id: str, model: type[Row], id_: str, kind: str) -> Row:
    """A tenant's row by id; another tenant's id answers the same NotFound as an unknown one."""
    row = session.get(model, id_)
    if row is None or row.tenant_id != tenant_id:
        raise not_found(kind, id_)
    return row


# --------------------------------------------------------------------------- datasets


def create_dataset(session: Session, tenant_id: str, storage: Storage, settings: Settings, filename: str | None,
                   chunks: Iterable[bytes]) -> Dataset:
    """Store an uploaded archive and check every image in it; unusable files are listed, a hostile or
    empty archive is refused (Invalid, with coft.data's code) and nothing of it is kept. An archive
    over COFT_INLINE_VALIDATION_BYTES is stored and left `validating`: the caller runs
    `validate_dataset` in the background."""
    check_quota(session, tenant_id, settings)
    dataset_id = new_id("ds")
    key = dataset_archive(dataset_id)
    size, sha256 = storage.write(key, chunks)
    try:
        check_quota(session, tenant_id, settings, incoming=size)
    except OverQuota:
        storage.delete(dataset_dir(dataset_id))
        raise
    dataset = Dataset(id=dataset_id, tenant_id=tenant_id, filename=_clean_name(filename), size_bytes=size,
                      sha256=sha256, num_images=0, num_parts=0, status=DatasetStatus.VALIDATING)
    if size > settings.inline_validation_bytes:
        session.add(dataset)
        session.commit()
        return dataset
    try:
        with dataset_images(storage, dataset, settings.data_limits()) as images:
            _record_images(dataset, images)
    except DataError as error:
        storage.delete(dataset_dir(dataset_id))
        raise Invalid(error.code, error.message, "Unusable dataset") from None
    session.add(dataset)
    session.commit()
    return dataset


def _clean_name(filename: str | None) -> str:
    # NUL is the one character PostgreSQL text refuses; a client-chosen name must not make a 500.
    return (filename or "upload").replace("\x00", "")[:500]


def _record_images(dataset: Dataset, images: ImageSet) -> None:
    rejected = [{"path": r.path, "reason": r.reason} for r in images.rejected]
    dataset.num_images, dataset.num_rejected = len(images), len(rejected)
    dataset.rejected = rejected[:MAX_REJECTED_STORED]
    dataset.status, dataset.error = DatasetStatus.READY, None


@contextmanager
def dataset_files(storage: Storage, dataset: Dataset) -> Iterator[list[Path]]:
    """Local copies, for the block, of the dataset's one archive or of all its parts (in upload order)."""
    if dataset.num_parts == 0:
        with storage.local_file(dataset_archive(dataset.id)) as path:
            yield [path]
    else:
        with storage.local_dir(dataset_parts(dataset.id)) as folder:
            yield sorted(folder.iterdir())


@contextmanager
def dataset_images(storage: Storage, dataset: Dataset, limits: DataLimits, verify: bool = True) -> Iterator[ImageSet]:
    """The dataset's images, from its one archive or all its parts."""
    with dataset_files(storage, dataset) as paths:
        yield open_images(paths, limits=limits, verify=verify)


def dataset_index(storage: Storage, dataset: Dataset, limits: DataLimits) -> ArchiveIndex:
    """A ready dataset's images by position, for reading a few (thumbnails). Its local copies (an S3
    store's download, linked parts) live as long as the index does, however many requests share it."""
    stack = ExitStack()
    try:
        index = ArchiveIndex(stack.enter_context(dataset_files(storage, dataset)), limits=limits)
    except BaseException:
        stack.close()
        raise
    weakref.finalize(index, stack.close)  # when the last request holding it is done, not at eviction
    return index


def thumbnail(images: ArchiveIndex, index: int, size: int) -> bytes:
    """Image `index` of a ready dataset (the order of its jobs' predictions), as a JPEG at most
    `size` pixels on its longer side."""
    if not 0 <= index < len(images):
        raise not_found("image", str(index))
    image = images.decode(index, at_least=(size, size))
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def validate_dataset(settings: Settings, storage: Storage, dataset_id: str) -> None:
    """Background validation of a stored dataset: `ready` with its counts, or `failed` with why. Run
    again on a dataset left `validating` (a restarted API does), it gives the same answer."""
    with session_scope(settings.database_url) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != DatasetStatus.VALIDATING:
            return
        try:
            with dataset_images(storage, dataset, settings.data_limits()) as images:
                _record_images(dataset, images)
        except DataError as error:
            dataset.status, dataset.error = DatasetStatus.FAILED, f"{error.code}: {error.message}"
        except Exception as error:  # noqa: BLE001 - a broken store must not leave it `validating` forever
            log.exception("dataset validation failed", extra={"dataset_id": dataset_id})
            dataset.status, dataset.error = DatasetStatus.FAILED, f"internal: {type(error).__name__}"
        log.info("dataset validated", extra={"dataset_id": dataset_id, "status": str(dataset.status)})


def datasets_left_validating(session: Session) -> list[str]:
    return list(session.scalars(select(Dataset.id).where(Dataset.status == DatasetStatus.VALIDATING)))


def check_quota(session: Session, tenant_id: str, settings: Settings, incoming: int = 0) -> None:
    """OverQuota when the tenant's stored datasets plus `incoming` bytes pass COFT_TENANT_QUOTA_BYTES."""
    if settings.tenant_quota_bytes is None:
        return
    used = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0))
                          .where(Dataset.tenant_id == tenant_id)) or 0
    if used + incoming > settings.tenant_quota_bytes or (incoming == 0 and used >= settings.tenant_quota_bytes):
        raise OverQuota("quota-exceeded", f"this tenant's datasets would hold {used + incoming} bytes, over its "
                        f"quota of {settings.tenant_quota_bytes}; delete datasets to make room", "Storage quota exceeded",
                        used_bytes=used, quota_bytes=settings.tenant_quota_bytes)


def create_upload(session: Session, tenant_id: str, settings: Settings, filename: str | None) -> Dataset:
    """An empty dataset to append archives to (`append_part`), then `finalize_upload`."""
    check_quota(session, tenant_id, settings)
    dataset = Dataset(tenant_id=tenant_id, filename=_clean_name(filename), size_bytes=0, sha256="", num_images=0,
                      num_parts=0, status=DatasetStatus.UPLOADING)
    session.add(dataset)
    session.commit()
    return dataset


def append_part(session: Session, tenant_id: str, storage: Storage, settings: Settings, dataset_id: str,
                chunks: Iterable[bytes]) -> Dataset:
    """Store one more archive of an `uploading` dataset. Parts are checked when the upload is finalised."""
    dataset = owned(session, tenant_id, Dataset, dataset_id, "dataset")
    _check_uploading(dataset)
    if dataset.num_parts >= settings.max_dataset_parts:
        raise Invalid("too-many-parts", f"a dataset has at most {settings.max_dataset_parts} parts",
                      "Too many parts")
    check_quota(session, tenant_id, settings)
    key = new_part_key(dataset_id)
    size, _ = storage.write(key, chunks)
    try:
        check_quota(session, tenant_id, settings, incoming=size)
        # Counted only while still uploading: a part racing the finalise is refused, not lost in it.
        counted = session.execute(update(Dataset).where(Dataset.id == dataset_id,
                                                        Dataset.status == DatasetStatus.UPLOADING)
                                  .values(num_parts=Dataset.num_parts + 1, size_bytes=Dataset.size_bytes + size))
        if counted.rowcount != 1:
            session.rollback()
            _check_uploading(session.get(Dataset, dataset_id, populate_existing=True))
        session.commit()
    except Exception:
        storage.delete(key)
        raise
    session.refresh(dataset)
    return dataset


def finalize_upload(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """No more parts: the dataset becomes `validating`; the caller runs `validate_dataset` in the background."""
    dataset = owned(session, tenant_id, Dataset, dataset_id, "dataset")
    _check_uploading(dataset)
    if dataset.num_parts == 0:
        raise Invalid("no-parts", "append at least one archive before finalising", "Nothing uploaded")
    # A dataset in parts is named by its size and count, not a hash of bytes it never held whole.
    digest = hashlib.sha256(f"{dataset_id}:{dataset.num_parts}:{dataset.size_bytes}".encode()).hexdigest()
    session.execute(update(Dataset).where(Dataset.id == dataset_id, Dataset.status == DatasetStatus.UPLOADING)
                    .values(status=DatasetStatus.VALIDATING, sha256=digest))
    session.commit()
    session.refresh(dataset)
    return dataset


def _check_uploading(dataset: Dataset | None) -> None:
    if dataset is not None and dataset.status != DatasetStatus.UPLOADING:
        raise Conflict("dataset-not-uploading", f"dataset {dataset.id} is {dataset.status}: parts can be appended "
                       "only before it is finalised", "Dataset not uploading", dataset_status=str(dataset.status))


def ready_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's dataset, if jobs can use it now (Conflict while it uploads or validates)."""
    dataset = owned(session, tenant_id, Dataset, dataset_id, "dataset")
    if dataset.status != DatasetStatus.READY:
        detail = dataset.error if dataset.status == DatasetStatus.FAILED else "wait until its status is ready"
        raise Conflict("dataset-not-ready", f"dataset {dataset.id} is {dataset.status}: {detail}",
                       "Dataset not ready", dataset_status=str(dataset.status))
    return dataset


def delete_dataset(session: Session, tenant_id: str, storage: Storage, dataset_id: str) -> None:
    dataset = owned(session, tenant_id, Dataset, dataset_id, "dataset")
    active = session.scalars(select(Job.id).where(
        or_(Job.dataset_id == dataset_id, Job.eval_dataset_id == dataset_id),
        Job.status.in_([s for s in JobStatus if s.active]))).all()
    if active:
        raise Conflict("dataset-in-use", f"jobs {', '.join(active)} use this dataset; cancel them or wait",
                       "Dataset in use", jobs=list(active))
    session.delete(dataset)
    session.commit()
    storage.delete(dataset_dir(dataset_id))


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobRequest:
    """A validated job request (app.api.schemas.JobCreate checks the shapes; this module the rest)."""

    dataset_id: str
    class_names: list[str]
    method: str
    model: str | None  # None: the service's default model
    pretrained: str | None
    template: str | None
    config: dict[str, Any] | None
    eval_dataset_id: str | None
    class_descriptions: dict[str, list[str]] | None
    callback_url: str | None = None
    callback_secret: str | None = None
    parent_job_id: str | None = None
    labels: dict[str, str] | None = None


def method_config(request: JobRequest) -> dict:
    """The user's overrides with the template folded in, validated by coft (Invalid on unknown keys/types)."""
    overrides = json.loads(json.dumps(request.config or {}))
    if request.template is not None:
        if not isinstance(overrides.setdefault("pseudo_labels", {}), dict):
            raise Invalid("invalid-config", "config.pseudo_labels must be an object", "Invalid config")
        overrides["pseudo_labels"]["template"] = request.template
    try:
        check_job(request.method, CoFTConfig.from_dict(overrides))
    except ValueError as error:
        raise Invalid("invalid-config", str(error), "Invalid config") from None
    return overrides


def create_job(session: Session, tenant_id: str, request: JobRequest, *, settings: Settings, storage: Storage,
               celery: Celery | None, idempotency_key: str | None, request_hash: str) -> tuple[Job, bool]:
    """A new QUEUED job, committed and then enqueued; or, for an Idempotency-Key seen before with the
    same request, that first job. Returns (job, replayed)."""
    if idempotency_key is not None and (replay := _replay(session, tenant_id, idempotency_key, request_hash)):
        return replay, True
    dataset = ready_dataset(session, tenant_id, request.dataset_id)
    if request.eval_dataset_id is not None:
        _check_eval_dataset(ready_dataset(session, tenant_id, request.eval_dataset_id),
                            request.class_names, storage, settings)
    model = request.model or settings.default_model
    backbones.resolve(settings, model, request.pretrained)
    if request.callback_url is not None:
        webhooks.check_callback_url(request.callback_url, settings)
    if request.parent_job_id is not None:
        owned(session, tenant_id, Job, request.parent_job_id, "job")
    if request.labels:
        _check_labels(request, dataset, storage, settings)
    job = Job(tenant_id=tenant_id, dataset_id=dataset.id, eval_dataset_id=request.eval_dataset_id,
              class_names=request.class_names, method=request.method, backbone_model=model,
              backbone_pretrained=request.pretrained, template=request.template, config=method_config(request),
              class_descriptions=request.class_descriptions, idempotency_key=idempotency_key,
              callback_url=request.callback_url, callback_secret=request.callback_secret,
              parent_job_id=request.parent_job_id, labels=request.labels or None,
              request_hash=request_hash)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        session.rollback()
        replay = _replay(session, tenant_id, idempotency_key, request_hash)
        if replay is None:
            raise
        return replay, True
    _enqueue(session, celery, job)
    return job, False


def _enqueue(session: Session, celery: Celery | None, job: Job) -> None:
    # Committed before it is enqueued: the worker must find the row the message points to.
    try:
        enqueue_job(celery, job.id)
    except Exception as error:  # noqa: BLE001 - any broker failure
        log.error("could not enqueue job", extra={"job_id": job.id, "error": repr(error)})
        fail_unqueued(session, job.id, "queue-unavailable", "the job could not be enqueued")
        raise Unavailable("queue-unavailable", "the job queue is unavailable; try again later",
                          "Service unavailable") from None
    log.info("job created", extra={"job_id": job.id, "tenant_id": job.tenant_id, "method": job.method})


PREDICT_METHOD = "predict"  # a job that labels a stored dataset with an existing classifier


def create_prediction_job(session: Session, tenant_id: str, classifier_id: str, dataset_id: str, top_k: int,
                          celery: Celery | None) -> Job:
    """A QUEUED job that runs the classifier over a whole dataset, too large for predict requests;
    its predictions are read like any job's (`read_job_predictions`, `job_predictions_rows`)."""
    classifier = classifier_by_id_or_alias(session, tenant_id, classifier_id)
    dataset = ready_dataset(session, tenant_id, dataset_id)
    job = Job(tenant_id=tenant_id, dataset_id=dataset.id, class_names=classifier.class_names, method=PREDICT_METHOD,
              backbone_model=classifier.backbone_model, backbone_pretrained=classifier.backbone_pretrained,
              config={"top_k": top_k}, classifier_id=classifier.id)
    session.add(job)
    session.commit()
    _enqueue(session, celery, job)
    return job


def _check_labels(request: JobRequest, dataset: Dataset, storage: Storage, settings: Settings) -> None:
    """Labelled images must be the dataset's, with the job's classes, and for a method that trains."""
    if request.method == "zero-shot":
        raise Invalid("labels-need-training", "labels are trained on: use method coft or coft+")
    unknown_classes = sorted({label for label in request.labels.values() if label not in request.class_names})
    if unknown_classes:
        raise Invalid("unknown-class", f"labels name classes the job does not have: {unknown_classes[:10]}",
                      "Unknown class")
    with dataset_images(storage, dataset, settings.data_limits(), verify=False) as images:
        names = set(images.names)
    missing = sorted(name for name in request.labels if name not in names)
    if missing:
        raise Invalid("unknown-image", f"labels name images the dataset does not have: {missing[:10]}",
                      "Unknown image", missing=missing[:100])


def _replay(session: Session, tenant_id: str, key: str, request_hash: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is not None and job.request_hash != request_hash:
        raise Conflict("idempotency-key-reused", "this Idempotency-Key was used with a different request body",
                       "Idempotency key reused", job_id=job.id)
    return job


def _check_eval_dataset(dataset: Dataset, class_names: list[str], storage: Storage, settings: Settings) -> None:
    """Fail now, not an hour into training, if the holdout's folders are not the job's classes."""
    if dataset.num_parts:
        raise Invalid("eval-dataset-in-parts", "an eval dataset is one archive (class folders), not parts")
    try:
        with storage.local_file(dataset_archive(dataset.id)) as path:
            open_labelled_images(path, class_names=class_names, limits=settings.data_limits())
    except DataError as error:
        raise Invalid(error.code, f"eval dataset: {error.message}", "Unusable eval dataset") from None
    except ValueError as error:
        raise Invalid("invalid-class-names", str(error), "Invalid class names") from None


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one becomes CANCELLING (its worker stops within
    seconds). A finished job cannot be cancelled (Conflict); a cancelled one stays so."""
    owned(session, tenant_id, Job, job_id, "job")
    after = request_cancel(session, job_id)
    if after in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise Conflict("job-finished", f"the job already {after.value}", "Job already finished")
    session.expire_all()
    return owned(session, tenant_id, Job, job_id, "job")


def read_job_predictions(session: Session, tenant_id: str, storage: Storage, job_id: str,
                         cached: Callable[[str, Callable[[], list[dict]]], list[dict]] | None = None) -> list[dict]:
    """The classifier's label for every image of the job's dataset, in archive path order. A
    finished job's predictions never change: `cached(key, load)` may keep them (the API does)."""
    job = owned(session, tenant_id, Job, job_id, "job")
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict("job-not-succeeded", f"the job is {job.status.value}; predictions exist once it succeeds",
                       "No predictions yet")

    def load() -> list[dict]:
        with storage.open(job_predictions(job_id)) as handle:
            rows = json.load(handle)
        for index, row in enumerate(rows):  # in dataset order: jobs from before `index` was stored
            row.setdefault("index", index)
        return rows
    return load() if cached is None else cached(job_id, load)


# What the method did with each image, as sets of a job's predictions (the dashboard's gallery).
ReviewSet = Literal["all", "s_star", "clean_model1", "clean_model2", "rejected_model1", "rejected_model2",
                    "labelled"]


def _in_set(row: dict, set_name: str) -> tuple[bool, str | None]:
    """Whether a prediction row is in a review set, and the label it has there: the zero-shot label
    in S*, model i's label in its clean and rejected sets, the given one when labelled, else the final."""
    if set_name == "all":
        return True, row["label"]
    if set_name == "s_star":
        return row["s_star"], row["zero_shot_label"]
    if set_name == "labelled":
        return row.get("given_label") is not None, row.get("given_label")
    kind, _, model = set_name.partition("_model")  # "rejected_model2" -> ("rejected", "2")
    i = int(model) - 1
    if i >= len(row["model_labels"]):  # a zero-shot job: no Phase I models
        return False, None
    return row["clean"][i] == (kind == "clean"), row["model_labels"][i]


def filter_predictions(rows: list[dict], set_name: ReviewSet = "all", label: str | None = None,
                       min_probability: float = 0.0, max_probability: float = 1.0) -> list[dict]:
    """The rows of one review set, of one class (by the set's label) and within a confidence range."""
    if set_name != "all" and rows and "s_star" not in rows[0]:
        raise Conflict("no-review", f"set {set_name!r} needs what an adaptation job records about each image; "
                       "this job has only `all` (a prediction job, or one from before the service recorded it)",
                       "Nothing to review")
    kept = []
    for row in rows:
        inside, its_label = _in_set(row, set_name)
        if inside and (label is None or its_label == label) and min_probability <= row["probability"] <= max_probability:
            kept.append(row)
    return kept


def job_predictions_rows(predictions: list[dict], format: str) -> Iterator[bytes]:
    """The predictions as a file: CSV (path,label,probability) or JSON Lines (one object per image)."""
    if format == "csv":
        yield b"path,label,probability\n"
        for row in predictions:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerow([row["name"], row["label"], f"{row['probability']:.6f}"])
            yield buffer.getvalue().encode()
    else:
        for row in predictions:
            yield (json.dumps(row) + "\n").encode()


# --------------------------------------------------------------------------- classifiers


ALIAS_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # and not `clf_...`: an alias never shadows an id


def classifier_by_id_or_alias(session: Session, tenant_id: str, reference: str) -> Classifier:
    """A tenant's classifier by id (`clf_...`) or by one of its aliases (`production`)."""
    if not reference.startswith("clf_"):
        alias = session.get(ClassifierAlias, (tenant_id, reference))
        if alias is not None:
            return owned(session, tenant_id, Classifier, alias.classifier_id, "classifier")
    return owned(session, tenant_id, Classifier, reference, "classifier")


def artifact_key_of(connection: Connection, tenant_id: str, reference: str) -> str:
    """The artifact key of a tenant's classifier by id or alias, as `classifier_by_id_or_alias` finds
    it, in one Core query on a pooled connection: predict asks on every request, and an ORM session
    with its identity map costs several times the query."""
    classifier_id = reference if reference.startswith("clf_") else (
        select(ClassifierAlias.classifier_id)
        .where(ClassifierAlias.tenant_id == tenant_id, ClassifierAlias.name == reference).scalar_subquery())
    key = connection.execute(select(Classifier.artifact_key).where(
        Classifier.id == classifier_id, Classifier.tenant_id == tenant_id)).scalar_one_or_none()
    if key is None:
        raise not_found("classifier", reference)
    return key


def set_alias(session: Session, tenant_id: str, name: str, classifier_id: str) -> ClassifierAlias:
    """Point `name` at a classifier (creating it, or moving it in one update)."""
    if name.startswith("clf_"):
        raise Invalid("invalid-alias", "an alias cannot start with `clf_`: that is how classifier ids start")
    target = classifier_by_id_or_alias(session, tenant_id, classifier_id)
    alias = session.get(ClassifierAlias, (tenant_id, name))
    if alias is None:
        alias = ClassifierAlias(tenant_id=tenant_id, name=name, classifier_id=target.id)
        session.add(alias)
    else:
        alias.classifier_id, alias.updated_at = target.id, utcnow()
    try:
        session.commit()
    except IntegrityError:  # created concurrently by another request: move that one instead
        session.rollback()
        return set_alias(session, tenant_id, name, classifier_id)
    return alias


def list_aliases(session: Session, tenant_id: str) -> list[ClassifierAlias]:
    return list(session.scalars(select(ClassifierAlias).where(ClassifierAlias.tenant_id == tenant_id)
                                .order_by(ClassifierAlias.name)))


def get_alias(session: Session, tenant_id: str, name: str) -> ClassifierAlias:
    alias = session.get(ClassifierAlias, (tenant_id, name))
    if alias is None:
        raise not_found("alias", name)
    return alias


def delete_alias(session: Session, tenant_id: str, name: str) -> None:
    session.delete(get_alias(session, tenant_id, name))
    session.commit()


def delete_classifier(session: Session, tenant_id: str, storage: Storage, classifier_id: str) -> str:
    """Delete a classifier's row, then every version of its artifact; returns the key it was served from."""
    row = owned(session, tenant_id, Classifier, classifier_id, "classifier")
    aliases = session.scalars(select(ClassifierAlias.name).where(ClassifierAlias.classifier_id == row.id)).all()
    if aliases:
        raise Conflict("classifier-aliased", f"aliases {', '.join(aliases)} name this classifier; move or delete "
                       "them first", "Classifier has aliases", aliases=list(aliases))
    active = session.scalars(select(Job.id).where(Job.classifier_id == classifier_id, Job.method == PREDICT_METHOD,
                                                  Job.status.in_([s for s in JobStatus if s.active]))).all()
    if active:
        raise Conflict("classifier-in-use", f"prediction jobs {', '.join(active)} use this classifier; cancel "
                       "them or wait", "Classifier in use", jobs=list(active))
    artifact_key = row.artifact_key
    session.execute(update(Job).where(Job.classifier_id == classifier_id).values(classifier_id=None))
    session.delete(row)
    session.commit()
    storage.delete(classifier_dir(classifier_id))
    return artifact_key


def export_archive(storage: Storage, classifier: Classifier, format: str) -> Path:
    """A temporary file holding the classifier for download (the caller deletes it): its artifact as
    tar.gz or zip, or its ONNX export as zip, made on first request and kept next to the artifact."""
    handle, name = tempfile.mkstemp(suffix=f".{format}")
    os.close(handle)
    archive_path, root = Path(name), classifier.id
    if format == "onnx":
        key = onnx_export_key(classifier.artifact_key)
        if not storage.exists(key):
            with storage.local_dir(classifier.artifact_key) as source, tempfile.TemporaryDirectory() as scratch:
                files = export_onnx(LoadedClassifier.load(source, device="cpu"), Path(scratch) / "onnx")
                with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
                    for path in files:
                        archive.write(path, f"{root}/{path.name}")
            with archive_path.open("rb") as handle_in:
                storage.write(key, iter(lambda: handle_in.read(1 << 20), b""))
            return archive_path
        with storage.open(key) as stored, archive_path.open("wb") as out:
            shutil.copyfileobj(stored, out)
        return archive_path
    with storage.local_dir(classifier.artifact_key) as source:
        if format == "zip":
            with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(source.rglob("*")):
                    archive.write(path, f"{root}/{path.relative_to(source).as_posix()}")
        else:
            with tarfile.open(archive_path, "w:gz") as archive:
                archive.add(source, arcname=root)
    return archive_path

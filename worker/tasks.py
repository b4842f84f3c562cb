"""The one task: run a job. Thin glue between the job row and coft.pipeline.adapt.

Claim the row (QUEUED -> RUNNING), run adapt() with a progress callback that writes progress to the
row and stops the run when the row says so (cancel, or the job was handed to another worker),
store the artifact and the predictions, then SUCCEEDED. A heartbeat thread keeps `heartbeat_at`
fresh even when adapt() is silent (loading a large backbone), so the sweeper can tell a slow job
from a dead worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from celery.exceptions import SoftTimeLimitExceeded

from app.core import backbones
from app.core.db import session_scope
from app.core.errors import ServiceError
from app.core.jobs import claim, fail, heartbeat, mark_cancelled, status_of, succeed
from app.core.crud import PREDICT_METHOD, dataset_images
from app.core.models import Classifier, Dataset, Job, JobStatus, new_id
from app.core.queue import TASK_NAME
from app.core.settings import Settings, get_settings
from app.core.storage import (classifier_dir, dataset_archive, get_storage, job_checkpoints, job_predictions,
                              new_artifact_key)
# Importing adapt here, in the parent, loads torch and the method: each forked job process starts fast.
from coft import Classifier as LoadedClassifier
from coft import CoFTConfig, DataError, LabelledImages, LLMEndpoint, Progress, adapt, open_labelled_images
from worker.celery_app import celery_app

log = logging.getLogger("worker.tasks")


class Stopped(Exception):
    """The row no longer says RUNNING for our attempt: cancelled, or taken over after we went silent."""


class JobFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@celery_app.task(name=TASK_NAME, ignore_result=True, bind=True)
def run_job(task, job_id: str) -> None:
    JobRun(get_settings(), job_id, task.request.hostname or socket.gethostname()).run()


def _json_safe(value: Any) -> Any:
    """Metrics as JSON: tensors become lists, anything else unknown becomes its string."""
    def default(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return item.tolist()
        return str(item)
    return json.loads(json.dumps(value, default=default))


def _labelled(images, labels: dict[str, str] | None, class_names: list[str]) -> LabelledImages | None:
    """The images the user labelled (by path in the dataset), as labelled shots for adapt()."""
    if not labels:
        return None
    position = {name: i for i, name in enumerate(images.names)}
    named = [(position[name], class_names.index(label)) for name, label in sorted(labels.items())
             if name in position]
    return LabelledImages([images[i] for i, _ in named], torch.tensor([label for _, label in named]))


class JobRun:
    def __init__(self, settings: Settings, job_id: str, node: str):
        self.settings, self.job_id = settings, job_id
        self.db = settings.database_url
        self.storage = get_storage(settings)
        self.work = None  # the job's working directory in the store, once the run has started
        self.worker = f"{node}:{os.getpid()}"  # the Celery node (name@host) and the job's process
        self.attempt = 0
        self.stop = threading.Event()  # set by the heartbeat thread when the row stops saying RUNNING
        self.done = threading.Event()
        self.last_write, self.last_stage = 0.0, None
        self.resumed_stages: list[str] = []  # loaded from an earlier attempt's checkpoints, shown in metrics

    def run(self) -> None:
        with session_scope(self.db) as session:
            attempt = claim(session, self.job_id, self.worker)
        if attempt is None:  # a duplicate message, or cancelled while queued: nothing to do
            log.info("job not claimed", extra={"job_id": self.job_id})
            return
        self.attempt = attempt
        log.info("job started", extra={"job_id": self.job_id, "attempt": attempt})
        beat = threading.Thread(target=self._heartbeat_loop, name="coft-heartbeat", daemon=True)
        beat.start()
        terminal = True
        try:
            self._execute()
        except Stopped:
            with session_scope(self.db) as session:
                if status_of(session, self.job_id) == JobStatus.CANCELLING:
                    mark_cancelled(session, self.job_id, attempt)
                    log.info("job cancelled", extra={"job_id": self.job_id})
                else:  # another attempt owns the job now: leave its row and checkpoints alone
                    terminal = False
                    log.warning("job taken over, stopping", extra={"job_id": self.job_id})
        except SoftTimeLimitExceeded:
            self._fail("time-limit", f"the job ran longer than {self.settings.job_time_limit_s} s")
        except JobFailure as failure:
            self._fail(failure.code, failure.message)
        except DataError as error:
            self._fail(error.code, error.message)
        except Exception as error:  # noqa: BLE001 - whatever adapt() raised, the row must say why
            log.exception("job failed", extra={"job_id": self.job_id})
            self._fail("adaptation-failed", f"{type(error).__name__}: {error}")
        finally:
            self.done.set()
            beat.join(5)
        if terminal:
            self.storage.delete(job_checkpoints(self.job_id))  # only a retry would need them

    def _fail(self, code: str, message: str) -> None:
        with session_scope(self.db) as session:
            after = fail(session, self.job_id, self.attempt, code, message)
        log.info("job ended", extra={"job_id": self.job_id, "status": after and after.value, "error_code": code})

    # -- the work ---------------------------------------------------------------------------

    def _execute(self) -> None:
        with session_scope(self.db) as session:
            job = session.get(Job, self.job_id)
            dataset = session.get(Dataset, job.dataset_id) if job.dataset_id is not None else None
        if dataset is None:
            raise JobFailure("dataset-deleted", "the job's dataset was deleted")
        if job.method == PREDICT_METHOD:
            return self._predict_dataset(job, dataset)
        try:
            model, pretrained = backbones.resolve(self.settings, job.backbone_model, job.backbone_pretrained)
        except ServiceError as error:
            raise JobFailure(error.slug, error.detail) from None
        config = CoFTConfig.from_dict(job.config)
        # Datasets were decoded whole when they were uploaded: here only headers are read, and the run
        # decodes each image once, into its cache.
        with dataset_images(self.storage, dataset, self.settings.data_limits(), verify=False) as opened:
            images = opened
        evaluation = None
        if job.eval_dataset_id is not None:
            with self.storage.local_file(dataset_archive(job.eval_dataset_id)) as path:
                labelled = open_labelled_images(path, class_names=job.class_names,
                                                limits=self.settings.data_limits(), verify=False)
            evaluation = LabelledImages(labelled.images, torch.tensor(labelled.labels))
        # Checkpoints go to the store after every stage, so another host can resume the job from them.
        with self.storage.work_dir(job_checkpoints(self.job_id)) as work:
            self.work = work
            result = adapt(images, job.class_names, method=job.method, model=model, pretrained=pretrained,
                           config=config, progress=self._progress, checkpoint_dir=work.path,
                           evaluation=evaluation, device=self.settings.device,
                           descriptions=job.class_descriptions, llm=self._llm(),
                           labelled_shots=_labelled(images, job.labels, job.class_names))
        if self.stop.is_set():
            raise Stopped()

        classifier_id = new_id("clf")
        artifact_key = new_artifact_key(classifier_id)  # written whole before any row names it
        with tempfile.TemporaryDirectory() as scratch:
            artifact = result.classifier.save(Path(scratch) / "artifact")
            size = self.storage.put_dir(artifact_key, artifact)
        # The predictions, with what the method did with each image (the dashboard's gallery filters on it).
        given = job.labels or {}
        predictions = [{"index": index, "name": name, "label": label, "probability": probability, **review,
                        "given_label": given.get(name)}
                       for index, (name, label, probability, review) in enumerate(zip(
                           images.names, result.predictions.labels, result.predictions.confidences, result.review()))]
        self.storage.write(job_predictions(self.job_id), [json.dumps(predictions).encode()])
        row = Classifier(id=classifier_id, tenant_id=job.tenant_id, job_id=job.id, class_names=job.class_names,
                         method=job.method, backbone_model=job.backbone_model,
                         backbone_pretrained=job.backbone_pretrained,
                         num_members=len(result.classifier.members), size_bytes=size, artifact_key=artifact_key)
        with session_scope(self.db) as session:
            succeeded = succeed(session, self.job_id, self.attempt, row, self._metrics(result.metrics))
        if not succeeded:  # cancelled (or taken over) while the artifact was being written
            self.storage.delete(classifier_dir(classifier_id))
            self.storage.delete(job_predictions(self.job_id))
            raise Stopped()
        log.info("job succeeded", extra={"job_id": self.job_id, "classifier_id": classifier_id})

    def _predict_dataset(self, job: Job, dataset: Dataset) -> None:
        """A prediction job: the classifier it names, over every image of its dataset."""
        with session_scope(self.db) as session:
            row = session.get(Classifier, job.classifier_id) if job.classifier_id else None
        if row is None:
            raise JobFailure("classifier-deleted", "the job's classifier was deleted")
        with self.storage.local_dir(row.artifact_key) as path:
            model = LoadedClassifier.load(path, device=self.settings.device)
        with dataset_images(self.storage, dataset, self.settings.data_limits(), verify=False) as opened:
            images = opened
        predictions = model.predict(images, batch_size=self.settings.predict_max_batch, progress=self._progress)
        rows = [{"index": index, "name": name, "label": label, "probability": probability,
                 "top_k": [{"label": other, "probability": p} for other, p in ranked]}
                for index, (name, label, probability, ranked) in enumerate(zip(
                    images.names, predictions.labels, predictions.confidences, predictions.top_k(job.config.get("top_k", 5))))]
        self.storage.write(job_predictions(self.job_id), [json.dumps(rows).encode()])
        with session_scope(self.db) as session:
            succeeded = succeed(session, self.job_id, self.attempt, None, {"images": len(rows)})
        if not succeeded:  # cancelled (or taken over) while the result was being written
            self.storage.delete(job_predictions(self.job_id))
            raise Stopped()
        log.info("prediction job succeeded", extra={"job_id": self.job_id, "images": len(rows)})

    # -- progress, heartbeat, cancellation ------------------------------------------------------

    def _llm(self) -> LLMEndpoint | None:
        """The settings' chat-completions endpoint for CoFT+'s class descriptions, if one is configured."""
        settings = self.settings
        if not settings.llm_base_url or not settings.llm_model:
            return None
        return LLMEndpoint(settings.llm_base_url, settings.llm_model, settings.llm_api_key, settings.llm_timeout_s)

    def _progress(self, event: Progress) -> None:
        """Called by adapt() many times per stage. Raising here stops the run (coft's contract)."""
        if self.settings.worker_progress_delay_s:
            time.sleep(self.settings.worker_progress_delay_s)
        if self.stop.is_set():
            raise Stopped()
        if event.resumed:  # a stage an earlier attempt finished
            self.resumed_stages.append(event.stage)
        if event.message == "done" and event.stage_fraction >= 1.0 and self.work is not None:
            self.work.sync()  # the stage's checkpoint, into the store
        now = time.monotonic()
        # Write on every stage change (users watch stages) and otherwise at the heartbeat rate.
        if event.stage == self.last_stage and now - self.last_write < self.settings.heartbeat_interval_s:
            return
        self.last_stage, self.last_write = event.stage, now
        with session_scope(self.db) as session:
            alive = heartbeat(session, self.job_id, self.attempt, stage=event.stage, progress=event.fraction,
                              eta_s=event.eta_s, metrics=self._metrics(event.metrics))
        if not alive:
            self.stop.set()
            raise Stopped()

    def _metrics(self, metrics: dict) -> dict:
        if self.resumed_stages:
            metrics = {**metrics, "resumed_stages": self.resumed_stages}
        return _json_safe(metrics)

    def _heartbeat_loop(self) -> None:
        while not self.done.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.db) as session:
                    if not heartbeat(session, self.job_id, self.attempt):
                        self.stop.set()
                        return
            except Exception:  # noqa: BLE001 - a missed beat is fine; a stale one is the sweeper's call
                log.warning("heartbeat failed", extra={"job_id": self.job_id}, exc_info=True)

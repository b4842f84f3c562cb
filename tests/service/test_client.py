"""coft.client against the real service: the whole story, typed errors, retries on 429 with
Retry-After, and the async client."""

from __future__ import annotations

import asyncio
import csv
import io
import time

import pytest

from app.api.main import create_app
from coft.client import AsyncClient, Client, Conflict, Invalid, Job, NotFound, RateLimited, Unauthorized
from tests.service.conftest import ServerThread
from tests.service.helpers import TINY_CONFIG, TINY_MODEL, image_zip, png


@pytest.fixture
def client(stack):
    with Client(stack.base_url, stack.new_key()) as coft:
        yield coft


def test_the_story_through_the_client(worker_stack, client, tmp_path, capsys):
    archive = tmp_path / "photos.zip"
    archive.write_bytes(image_zip(12))
    dataset = client.upload_dataset(archive)
    assert dataset.status == "ready" and dataset.num_images == 12 and dataset.filename == "photos.zip"
    assert client.list_datasets().items[0].id == dataset.id

    job = client.create_job(dataset.id, ["cat", "dog"], "coft", model=TINY_MODEL, config=TINY_CONFIG)
    assert isinstance(job, Job) and job.status == "queued"
    done = client.wait(job.id, poll_s=0.1)
    assert done.status == "succeeded" and done.progress == 1.0 and done.classifier_id
    assert "100%" in capsys.readouterr().out  # the progress bar reached the end

    image = tmp_path / "new.png"
    image.write_bytes(png(0))
    [prediction] = client.predict(done.classifier_id, [image], top_k=2)
    assert prediction.filename == "new.png" and prediction.label in ("cat", "dog") and len(prediction.top_k) == 2
    first = client.job_predictions(done.id, limit=1).items[0]
    assert (first.name, first.label) == ("img000.png", prediction.label)
    rows = list(csv.reader(io.StringIO(client.export_job_predictions(done.id).decode())))
    assert len(rows) == 13
    s_star = client.job_predictions(done.id, set="s_star", limit=200)
    assert s_star.total == done.metrics["s_star_size"] and all(p.s_star and p.zero_shot_label for p in s_star.items)
    mine = client.job_predictions(done.id, label=first.label, min_probability=first.probability)
    assert first.name in [p.name for p in mine.items] and all(p.label == first.label for p in mine.items)
    assert client.export_job_predictions(done.id, label="nothing-is-this").decode() == "path,label,probability\n"
    assert client.thumbnail(dataset.id, first.index, size=16)[:2] == b"\xff\xd8"  # a JPEG
    assert client.job_webhooks(done.id) == []

    assert client.set_alias("production", done.classifier_id).classifier_id == done.classifier_id
    assert client.get_classifier("production").id == done.classifier_id
    assert client.export_classifier("production")[:2] == b"\x1f\x8b"  # gzip
    batch = client.wait(client.predict_dataset("production", dataset.id).id, progress=False, poll_s=0.1)
    assert batch.status == "succeeded" and batch.metrics["images"] == 12
    with pytest.raises(Conflict) as refused:
        client.delete_classifier(done.classifier_id)
    assert refused.value.slug == "classifier-aliased" and refused.value.problem["aliases"] == ["production"]
    client.delete_alias("production")
    client.delete_classifier(done.classifier_id)
    with pytest.raises(NotFound) as gone:
        client.get_classifier(done.classifier_id)
    assert gone.value.status == 404 and gone.value.slug == "classifier-not-found"

    zero_shot = client.zero_shot_predict([png(1)], ["cat", "dog", "bird"], model=TINY_MODEL, top_k=3)
    assert len(zero_shot[0].top_k) == 3
    with pytest.raises(Invalid) as invalid:
        client.create_job(dataset.id, ["cat"], model=TINY_MODEL)
    assert invalid.value.slug == "invalid-class-names"


def test_a_wrong_key_is_unauthorized(stack):
    with Client(stack.base_url, "coft_" + "0" * 40) as stranger, pytest.raises(Unauthorized):
        stranger.list_jobs()


def test_429_is_retried_after_what_retry_after_says(stack):
    """A second API on the same database whose predict limit is 1 per second: the client waits."""
    settings = stack.settings.model_copy(update={"rate_limit_predict": "1/second", "redis_url": None})
    server = ServerThread(create_app(settings))
    server.start()
    try:
        key = stack.new_key()
        url = f"http://127.0.0.1:{server.port}"
        with Client(url, key, backoff_s=0.05) as patient:
            started = time.monotonic()
            for _ in range(3):
                patient.zero_shot_predict([png(1)], ["cat", "dog"], model=TINY_MODEL)
            assert time.monotonic() - started >= 1.0  # three calls in a 1-per-second window waited
        with Client(url, key, retries=0) as hasty, pytest.raises(RateLimited) as limited:
            for _ in range(3):
                hasty.zero_shot_predict([png(1)], ["cat", "dog"], model=TINY_MODEL)
        assert limited.value.problem["retry_after_s"] >= 1
    finally:
        server.stop()


def test_the_async_client(stack):
    async def story() -> None:
        async with AsyncClient(stack.base_url, stack.new_key()) as coft:
            dataset = await coft.upload_dataset(image_zip(3), filename="three.zip")
            assert (await coft.get_dataset(dataset.id)).num_images == 3
            predictions, page = await asyncio.gather(
                coft.zero_shot_predict([png(1), png(2)], ["cat", "dog"], model=TINY_MODEL),
                coft.list_datasets())
            assert len(predictions) == 2 and page.total == 1
            with pytest.raises(NotFound):
                await coft.get_job("job_nope")

    asyncio.run(story())

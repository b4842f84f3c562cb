"""The decoded-image cache (coft.image_cache): one decode per image, exact test-time rows, reuse."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from coft.data import DataError, open_images
from coft.image_cache import ImageCache, cached_images, image_fingerprint, train_size
from coft.loader import EvalTransform
from tests.conftest import draw_image


class CountingImages(Sequence):
    """PIL images that count how often each is decoded (and can be told to fail on one)."""

    def __init__(self, images, broken: int | None = None):
        self.images, self.broken = images, broken
        self.decoded = [0] * len(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        if index == self.broken:
            raise OSError(f"image {index} is unreadable")
        self.decoded[index] += 1
        return self.images[index]


def photos(count: int) -> list[Image.Image]:
    """Non-square images of several sizes, so that resize and crop matter."""
    return [draw_image(i, size=40 + 3 * i).resize((40 + 3 * i, 30 + 2 * i)) for i in range(count)]


def test_test_rows_are_open_clips_test_time_transform_exactly(tiny_backbone):
    images = photos(6)
    source = cached_images(images, tiny_backbone.preprocess_cfg, "cpu")
    expected = torch.stack([tiny_backbone.eval_transform()(image) for image in images])
    torch.testing.assert_close(source.test_view(torch.arange(6)), expected, atol=1e-6, rtol=0)
    reordered = source.test_view(torch.tensor([4, 0]))
    torch.testing.assert_close(reordered, expected[[4, 0]], atol=1e-6, rtol=0)


def test_the_batched_eval_transform_is_open_clips_test_time_transform(tiny_backbone):
    """What predict feeds the model: one batch, the same inputs as the per-image transform, in order
    (non-square images of several sizes, and a greyscale one, so that resize, crop and RGB matter)."""
    images = [*photos(5), photos(1)[0].convert("L")]
    batch = EvalTransform(tiny_backbone.preprocess_cfg)(images)
    expected = torch.stack([tiny_backbone.eval_transform()(image) for image in images])
    assert batch.shape == expected.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(EvalTransform(tiny_backbone.preprocess_cfg)(images[3:4]), expected[3:4],
                               atol=1e-6, rtol=0)


def test_train_rows_hold_the_same_view_at_the_training_scale(tiny_backbone):
    images = photos(4)
    source = cached_images(images, tiny_backbone.preprocess_cfg, "cpu", train_scale=1.15)
    assert train_size(tiny_backbone.preprocess_cfg, 1.15) == (37, 37)
    rows = source.pixels(torch.arange(4))
    assert rows.dtype == torch.uint8 and rows.shape == (4, 3, 37, 37)
    # Shrunk to the input size, a train row is close to the test row: the same crop of the image.
    shrunk = torch.nn.functional.interpolate(rows.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
    test = source.cache.read(torch.arange(4)).float() / 255
    assert (shrunk - test).abs().mean() < 0.05
    stats = source.cache.stats
    assert stats.bytes == 4 * 3 * (32 * 32 + 37 * 37) == source.cache.test_rows.nbytes + source.cache.train_rows.nbytes
    assert not source.cache.path.exists()  # a temporary cache lives on in its memory map alone


def test_test_rows_only_when_nothing_trains(tiny_backbone):
    source = cached_images(photos(3), tiny_backbone.preprocess_cfg, "cpu", train_scale=None)
    assert source.cache.stats.bytes == 3 * 3 * 32 * 32
    with pytest.raises(ValueError, match="test-time rows only"):
        source.pixels(torch.arange(2))


def test_a_cache_held_on_the_device_serves_the_same_inputs(tiny_backbone):
    from coft.image_cache import CachedImages

    images = photos(5)
    streamed = cached_images(images, tiny_backbone.preprocess_cfg, "cpu")
    resident = CachedImages(streamed.cache, tiny_backbone.preprocess_cfg, torch.device("cpu"), streamed.fingerprint,
                            on_device=True)
    assert resident.resident is not None and streamed.resident is None  # on a CPU it is opt-in
    order = torch.tensor([3, 0, 4])
    assert torch.equal(resident.test_view(order), streamed.test_view(order))
    assert torch.equal(resident.pixels(order), streamed.pixels(order))


def test_each_image_is_decoded_once_and_a_complete_cache_is_reused(tiny_backbone, tmp_path):
    images = CountingImages(photos(10))
    key = "the same ten images"
    first = ImageCache.build(images, tmp_path, tiny_backbone.preprocess_cfg, key=key)
    assert images.decoded == [1] * 10 and not first.stats.reused
    again = ImageCache.build(images, tmp_path, tiny_backbone.preprocess_cfg, key=key)
    assert again.stats.reused and images.decoded == [1] * 10  # nothing decoded the second time
    assert np.array_equal(np.asarray(again.test_rows), np.asarray(first.test_rows))
    other = ImageCache.build(images, tmp_path, tiny_backbone.preprocess_cfg, key="other images")
    assert not other.stats.reused and other.path != first.path


@pytest.mark.parametrize("damage", ["no marker", "short file"])
def test_a_partial_cache_is_rebuilt(tiny_backbone, tmp_path, damage):
    images = CountingImages(photos(5))
    cache = ImageCache.build(images, tmp_path, tiny_backbone.preprocess_cfg, key="k")
    expected = np.asarray(cache.test_rows).copy()
    del cache
    if damage == "no marker":
        next(tmp_path.glob("*.json")).unlink()
    else:
        data = next(tmp_path.glob("*.u8"))
        data.write_bytes(data.read_bytes()[:100])
    rebuilt = ImageCache.build(images, tmp_path, tiny_backbone.preprocess_cfg, key="k")
    assert not rebuilt.stats.reused and images.decoded == [2] * 5
    assert np.array_equal(np.asarray(rebuilt.test_rows), expected)


def test_threads_split_the_work_and_give_the_same_bytes(tiny_backbone, tmp_path):
    images = photos(24)
    one = ImageCache.build(images, tmp_path / "one", tiny_backbone.preprocess_cfg, key="k", threads=1)
    two = ImageCache.build(images, tmp_path / "two", tiny_backbone.preprocess_cfg, key="k", threads=2)
    assert one.stats.threads == 1 and two.stats.threads == 2
    assert np.array_equal(np.asarray(one.test_rows), np.asarray(two.test_rows))
    assert np.array_equal(np.asarray(one.train_rows), np.asarray(two.train_rows))


def test_a_failing_image_stops_the_build_and_leaves_no_complete_cache(tiny_backbone, tmp_path):
    images = CountingImages(photos(12), broken=7)
    with pytest.raises(OSError, match="image 7 is unreadable"):
        ImageCache.build(images, tmp_path, tiny_backbone.preprocess_cfg, key="k", threads=2)
    assert not list(tmp_path.glob("*.json"))


def test_progress_is_reported_and_a_raising_callback_stops_the_build(tiny_backbone, tmp_path):
    fractions = []
    ImageCache.build(photos(8), tmp_path / "a", tiny_backbone.preprocess_cfg, key="k",
                     report=lambda fraction, message: fractions.append(fraction))
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)

    class Stop(Exception):
        pass

    def stop(fraction, message):
        raise Stop

    with pytest.raises(Stop):
        ImageCache.build(photos(8), tmp_path / "b", tiny_backbone.preprocess_cfg, key="k", report=stop)
    assert not list((tmp_path / "b").glob("*.json"))


def test_a_cache_larger_than_the_free_disk_is_refused_before_writing(tiny_backbone, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))  # a full disk
    with pytest.raises(DataError) as info:
        ImageCache.build(photos(4), tmp_path, tiny_backbone.preprocess_cfg, key="k")
    assert info.value.code == "cache-space" and "GiB" in info.value.message
    assert not list(tmp_path.iterdir())


def test_jpegs_of_an_image_set_are_decoded_at_a_reduced_scale(tiny_backbone, tmp_path):
    """A 1600x1200 photo needed at 37 pixels decodes at 1/8 scale; the rows match a full decode closely."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((1600, 1200), Image.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=95)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(buffer.getvalue())
    image_set = open_images(tmp_path / "photos")
    reduced = cached_images(image_set, tiny_backbone.preprocess_cfg, "cpu")
    full = cached_images([image_set[0]], tiny_backbone.preprocess_cfg, "cpu")  # plain PIL: decoded whole
    difference = (reduced.cache.read(torch.arange(1)).float() - full.cache.read(torch.arange(1)).float()).abs()
    assert difference.mean() < 2.0


def test_the_fingerprint_tells_image_sets_apart():
    images = photos(4)
    assert image_fingerprint(images) == image_fingerprint(list(images))
    assert image_fingerprint(images) != image_fingerprint(images[:3])
    assert image_fingerprint(images) != image_fingerprint([images[0], images[1], images[2], images[0]])


def test_a_resumed_run_reuses_its_cache(tiny_backbone, tiny_images, tmp_path):
    from coft.pipeline import adapt

    config = {"pseudo_labels": {"top_k": 2}, "phase1": {"epochs": 1, "batch_size": 4, "context_tokens": 4,
                                                         "vpt_tokens": 2}, "phase2": {"epochs": 1, "batch_size": 4}}
    from coft.config import CoFTConfig

    first = adapt(tiny_images, ["a", "b", "c"], backbone=tiny_backbone, config=CoFTConfig.from_dict(config),
                  checkpoint_dir=tmp_path)
    assert first.metrics["image_cache"]["reused"] is False
    assert first.metrics["image_cache"]["bytes"] == len(tiny_images) * 3 * (32 * 32 + 37 * 37)
    again = adapt(tiny_images, ["a", "b", "c"], backbone=tiny_backbone, config=CoFTConfig.from_dict(config),
                  checkpoint_dir=tmp_path)
    assert again.metrics["image_cache"]["reused"] is True
    torch.testing.assert_close(again.predictions.probabilities, first.predictions.probabilities)

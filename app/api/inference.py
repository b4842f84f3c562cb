"""Predictions in the API process: uploaded images in, labels out, with loaded models cached.

Uploaded images go through coft.data.decode_image, the same validation as dataset archives (a
decompression bomb or a PDF named cat.jpg is refused the same way).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

import anyio
import python_multipart
import torch
from fastapi import UploadFile
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from coft import Classifier, DataError, ImageSet, Predictions, decode_image
from app.api.batcher import Batcher, BatcherClosed
from app.api.errors import Problem
from app.api.schemas import ImagePrediction, LabelProbability
from app.core.settings import Settings

V = TypeVar("V")


class LRUCache(Generic[V]):
    """A few loaded models (hundreds of MB each for real backbones), least recently used dropped.

    Loading one key does not hold up requests for another: the cache's lock guards only the
    bookkeeping, and each key has its own lock, so racing requests for one key load it once."""

    def __init__(self, size: int, on_evict: Callable[[V], None] | None = None):
        self.size = size
        self.on_evict = on_evict
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._loading: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:  # loaded by the request that held key_lock before us
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                self._loading.pop(key, None)
                evicted = [self._items.popitem(last=False)[1] for _ in range(len(self._items) - self.size)]
        for old in evicted:
            self._evicted(old)
        return value

    def discard(self, key: Hashable) -> None:
        with self._lock:
            value = self._items.pop(key, None)
        if value is not None:
            self._evicted(value)

    def _evicted(self, value: V) -> None:
        if self.on_evict is not None:
            self.on_evict(value)


@dataclass
class ServedClassifier:
    """A loaded classifier, its test-time transform and the batcher that runs its forward passes."""
    classifier: Classifier
    transform: Callable[[list], torch.Tensor]  # a list of images -> one batch of inputs
    batcher: Batcher

    @classmethod
    def start(cls, classifier: Classifier, settings: Settings, name: str,
              on_batch: Callable[[int], None] | None = None) -> "ServedClassifier":
        return cls(classifier, classifier.batch_transform(),
                   Batcher(classifier.probabilities, settings.predict_max_batch, settings.predict_max_wait_ms,
                           name=name, on_batch=on_batch))

    def pixels(self, image_set: ImageSet) -> torch.Tensor:
        """The model's inputs for the images (CPU work: call it off the event loop)."""
        return self.transform([image_set[i] for i in range(len(image_set))])

    async def predict(self, pixels: torch.Tensor) -> Predictions:
        """Join a batch with other requests' images (`pixels()` of them)."""
        try:
            probabilities = await asyncio.wrap_future(self.batcher.submit(pixels))
        except BatcherClosed:  # the model left the cache while this request held it: run it alone
            probabilities = await anyio.to_thread.run_sync(self.classifier.probabilities, pixels)
        return Predictions(self.classifier.class_names, probabilities)


def read_images(files: list[UploadFile], settings: Settings) -> ImageSet:
    """Decode uploads in request order, or a 422 problem naming every unusable file. The limits
    are the dataset ones (COFT_MAX_IMAGE_PIXELS, COFT_MAX_IMAGE_BYTES)."""
    limit = settings.data_limits().max_file_bytes
    return decode_images([(upload.filename or f"image-{i}", upload.file.read(limit + 1))
                          for i, upload in enumerate(files)], settings)


def multipart_files(content_type: str, body: bytes, field: str, max_file_bytes: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file in one field of a multipart body, in order, parsed with
    python-multipart. Unlike FastAPI's form parsing, which runs on the event loop chunk by chunk,
    this runs wherever it is called: predict calls it in its one trip off the loop. Each file is
    read up to `max_file_bytes` + 1, so a larger one is seen as too large."""
    files: list[tuple[str, bytes]] = []
    if parse_options_header(content_type)[0] != b"multipart/form-data":
        return files  # no files: the caller says what it wanted

    def on_file(part: python_multipart.File) -> None:
        if part.field_name == field.encode():
            part.file_object.seek(0)
            files.append(((part.file_name or b"").decode("utf-8", "replace") or f"image-{len(files)}",
                          part.file_object.read(max_file_bytes + 1)))
        part.close()

    try:
        parser = python_multipart.create_form_parser({"Content-Type": content_type.encode("latin-1")}, None, on_file)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as error:
        raise Problem(400, "bad-request", f"malformed multipart body: {error}", "Bad Request") from None
    return files


def decode_images(named: list[tuple[str, bytes]], settings: Settings) -> ImageSet:
    """(name, encoded bytes) of each image, decoded in order, or a 422 problem naming every unusable one."""
    if not named:
        raise Problem(422, "no-usable-images", "send one or more images in the multipart field `images`")
    if len(named) > settings.max_predict_images:
        raise Problem(422, "too-many-images",
                      f"at most {settings.max_predict_images} images per request, got {len(named)}")
    limits = settings.data_limits()
    decoded, rejected = [], []
    for name, data in named:
        try:
            if len(data) > limits.max_file_bytes:
                raise DataError("unusable-image", f"file too large (over {limits.max_file_bytes} bytes)")
            decoded.append(decode_image(data, limits=limits))
        except DataError as error:
            rejected.append({"filename": name, "reason": error.message})
    if rejected:
        raise Problem(422, "unusable-image", "; ".join(f"{r['filename']}: {r['reason']}" for r in rejected),
                      "Unusable image", rejected=rejected)
    return ImageSet.from_images(decoded, [name for name, _ in named])


def prediction_items(names: list[str], predictions: Predictions, top_k: int) -> list[ImagePrediction]:
    return [ImagePrediction(filename=name, label=label, probability=probability,
                            top_k=[LabelProbability(label=other, probability=p) for other, p in ranked])
            for name, label, probability, ranked in zip(names, predictions.labels, predictions.confidences,
                                                         predictions.top_k(top_k))]

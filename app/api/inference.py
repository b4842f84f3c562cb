"""Predictions in the API process: uploaded images in, labels out, with loaded models cached.

Uploaded images go through coft.data.decode_image, the same validation as dataset archives (a
decompression bomb or a PDF named cat.jpg is refused the same way).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

from fastapi import UploadFile

from coft import DataError, ImageSet, Predictions, decode_image
from app.api.errors import Problem
from app.api.schemas import ImagePrediction, LabelProbability
from app.core.settings import Settings

V = TypeVar("V")


class LRUCache(Generic[V]):
    """A few loaded models (hundreds of MB each for real backbones), least recently used dropped."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()  # one load per key even when requests race

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = load()
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)


def read_images(files: list[UploadFile], settings: Settings) -> ImageSet:
    """Decode uploads in request order, or a 422 problem naming every unusable file. The limits
    are the dataset ones (COFT_MAX_IMAGE_PIXELS, COFT_MAX_IMAGE_BYTES)."""
    if not files:
        raise Problem(422, "no-usable-images", "send one or more images in the multipart field `images`")
    if len(files) > settings.max_predict_images:
        raise Problem(422, "too-many-images",
                      f"at most {settings.max_predict_images} images per request, got {len(files)}")
    limits = settings.data_limits()
    decoded, rejected = [], []
    for upload in files:
        data = upload.file.read(limits.max_file_bytes + 1)
        try:
            if len(data) > limits.max_file_bytes:
                raise DataError("unusable-image", f"file too large (over {limits.max_file_bytes} bytes)")
            decoded.append(decode_image(data, limits=limits))
        except DataError as error:
            rejected.append({"filename": upload.filename, "reason": error.message})
    if rejected:
        raise Problem(422, "unusable-image", "; ".join(f"{r['filename']}: {r['reason']}" for r in rejected),
                      "Unusable image", rejected=rejected)
    return ImageSet.from_images(decoded, [upload.filename or f"image-{i}" for i, upload in enumerate(files)])


def prediction_items(files: list[UploadFile], predictions: Predictions, top_k: int) -> list[ImagePrediction]:
    return [ImagePrediction(filename=upload.filename or f"image-{i}", label=label, probability=probability,
                            top_k=[LabelProbability(label=name, probability=p) for name, p in ranked])
            for i, (upload, label, probability, ranked) in enumerate(
                zip(files, predictions.labels, predictions.confidences, predictions.top_k(top_k)))]

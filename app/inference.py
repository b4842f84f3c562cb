"""Predictions in the API process: uploaded images in, labels out, with loaded models cached.

Uploaded images go through coft.data.open_images, the same validation as dataset archives (a
decompression bomb or a PDF named cat.jpg is refused the same way). coft.data has no public
single-image decoder, so the files are packed into an in-memory, uncompressed zip for it.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

from fastapi import UploadFile

from coft.classifier import Classifier, ImageClassifier, Predictions, text_head
from coft.data import DataError, ImageSet, open_images
from app.errors import Problem
from app.schemas import ImagePrediction, LabelProbability

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


def read_images(files: list[UploadFile], max_images: int) -> ImageSet:
    """Decode uploads in request order, or a 422 problem naming every unusable file."""
    if not files:
        raise Problem(422, "no-usable-images", "send one or more images in the multipart field `images`")
    if len(files) > max_images:
        raise Problem(422, "too-many-images", f"at most {max_images} images per request, got {len(files)}")
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED) as archive:
        for index, upload in enumerate(files):
            # Decoding goes by content, not by name; the index keeps request order (names sort).
            archive.writestr(f"{index:06d}.png", upload.file.read())
    try:
        images = open_images(packed.getvalue())
    except DataError as error:
        raise Problem(422, error.code, error.message) from None
    if images.rejected:
        rejected = [{"filename": files[int(r.path[:6])].filename, "reason": r.reason} for r in images.rejected]
        raise Problem(422, "unusable-image", "; ".join(f"{r['filename']}: {r['reason']}" for r in rejected),
                      "Unusable image", rejected=rejected)
    return images


def prediction_items(files: list[UploadFile], predictions: Predictions, top_k: int) -> list[ImagePrediction]:
    return [ImagePrediction(filename=upload.filename or f"image-{i}", label=label, probability=probability,
                            top_k=[LabelProbability(label=name, probability=p) for name, p in ranked])
            for i, (upload, label, probability, ranked) in enumerate(
                zip(files, predictions.labels, predictions.confidences, predictions.top_k(top_k)))]


def zero_shot_classifier(backbone, class_names: list[str], template: str) -> Classifier:
    """Zero-shot CLIP as a coft Classifier: the head holds the class text embeddings (no training)."""
    from coft.prompts import class_text_features

    features = class_text_features(backbone, class_names, [template])
    member = ImageClassifier(backbone.model.visual, text_head(features, backbone.logit_scale))
    return Classifier([member], class_names, backbone.model_cfg, backbone.preprocess_cfg)

"""The images of one run: U, any labelled shots after it, and the optional labelled holdout, each
decoded once per geometry (coft.image_cache) and served to the stages as ImageSources."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from coft.backbone import Backbone
from coft.image_cache import ImageSource, cached_images, image_fingerprint
from coft.progress import StageReport


@dataclass
class LabelledImages:
    """Images with their true classes (indices into the job's class names): a holdout that only
    measures accuracy, or labelled shots that are trained on."""

    images: Sequence[Image.Image] | ImageSource
    labels: torch.Tensor


class RunImages:
    """`source("train")` is U followed by the labelled shots (`unlabeled` counts U; `shot_labels` are the
    shots' classes); `source("eval")` is the holdout. Each geometry (a backbone's preprocessing, on its
    device) is decoded once, into `cache_dir` when given (a resumed run reuses it)."""

    def __init__(self, images: Sequence[Image.Image] | ImageSource, *, labelled_shots: LabelledImages | None = None,
                 evaluation: LabelledImages | None = None, trains: bool = True, cache_scale: float = 1.15,
                 threads: int | None = None):
        self.unlabeled = len(images)
        self.shot_labels = torch.empty(0, dtype=torch.long)
        if labelled_shots is not None and len(labelled_shots.images):
            if not trains:
                raise ValueError("labelled shots need a method that trains (coft, coft+)")
            if isinstance(images, ImageSource) or isinstance(labelled_shots.images, ImageSource):
                raise ValueError("labelled shots are joined to the images as PIL images, not ImageSources")
            images = _Concat(images, labelled_shots.images)
            self.shot_labels = labelled_shots.labels.cpu().long()
        self.train, self.evaluation = images, evaluation
        self.trains, self.cache_scale, self.threads = trains, cache_scale, threads
        self.fingerprint = images.fingerprint if isinstance(images, ImageSource) else image_fingerprint(images)
        self.cache_dir: str | os.PathLike | None = None  # set once the run knows its checkpoint directory
        self._sources: dict[tuple, ImageSource] = {}

    def __len__(self) -> int:
        return len(self.train)

    def source(self, which: str, backbone: Backbone, report: StageReport | None = None,
               geometry_of: Backbone | None = None) -> ImageSource:
        """The images (`which` "train" or "eval") as `backbone` sees them. An ImageSource given by the
        caller serves one geometry only: that of `geometry_of` (the run's backbone)."""
        given = self.train if which == "train" else self.evaluation.images
        if isinstance(given, ImageSource):
            if geometry_of is not None and backbone.preprocess_cfg != geometry_of.preprocess_cfg:
                raise ValueError("an ImageSource serves one geometry; a Phase II backbone with other "
                                 "preprocessing needs PIL images")
            return given
        key = (which, json.dumps(backbone.preprocess_cfg, sort_keys=True), str(backbone.device))
        if key not in self._sources:
            trains = which == "train" and self.trains  # else test-time rows are all it needs
            self._sources[key] = cached_images(
                given, backbone.preprocess_cfg, backbone.device, directory=self.cache_dir,
                train_scale=self.cache_scale if trains else None, threads=self.threads, report=report,
                fingerprint=self.fingerprint if which == "train" else None)
        return self._sources[key]


class _Concat(Sequence):
    """Unlabeled images followed by labelled shots, without copying either."""

    def __init__(self, first: Sequence[Image.Image], second: Sequence[Image.Image]):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.decode(index)

    def decode(self, index: int, at_least: tuple[int, int] | None = None) -> Image.Image:
        """Image `index`, decoded at a reduced scale where the part allows it (coft.data.ImageSet)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part, offset = (self.first, index) if index < len(self.first) else (self.second, index - len(self.first))
        decode = getattr(part, "decode", None)
        return decode(offset, at_least) if decode is not None else part[offset]

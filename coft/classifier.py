"""The adapted classifier and its artifact format.

A classifier is one or more members, each a CLIP vision tower plus a linear head on the unit-norm
image embedding; its prediction is the mean of the members' softmax. Every method yields this one
type: zero-shot is a single member whose head holds the class text embeddings times CLIP's logit
scale, CoFT two fine-tuned members.

On disk, one directory:
    classifier.json       class names, backbone, preprocessing, method, config, quality signals
    model.safetensors     members.{i}.visual.*, members.{i}.head.{weight,bias}
Loading needs open_clip and torch, nothing from training.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from coft.backbone import autocast, default_device
from coft.config import DEFAULT_TEMPLATE
from coft.openclip import build_vision_tower, image_embedding
from coft.image_cache import ImageSource
from coft.loader import EvalTransform, map_batches
from coft.progress import ProgressCallback, ProgressTracker
from coft.training import in_order

if TYPE_CHECKING:
    from coft.backbone import Backbone

ARTIFACT_FORMAT = "coft-classifier"
ARTIFACT_VERSION = 1
METADATA_FILE = "classifier.json"
WEIGHTS_FILE = "model.safetensors"


class ImageClassifier(nn.Module):
    """A vision tower and a linear head on its unit-norm embedding: logits = W v/|v| + b."""

    def __init__(self, visual: nn.Module, head: nn.Linear):
        super().__init__()
        self.visual = visual
        self.head = head

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The unit-norm image embedding the head reads."""
        return F.normalize(image_embedding(self.visual(pixels)), dim=-1)

    def classify(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits from unit-norm embeddings (what `embed` returns)."""
        return self.head(embeddings.to(self.head.weight.dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(pixels))


def text_head(class_features: torch.Tensor, scale: float) -> nn.Linear:
    """A head that reproduces zero-shot CLIP: W = scale * text embeddings, b = 0."""
    head = nn.Linear(class_features.shape[1], class_features.shape[0])
    with torch.no_grad():
        head.weight.copy_(class_features * scale)
        head.bias.zero_()
    return head.to(class_features.device)


def zero_shot_classifier(backbone: "Backbone", class_names: Sequence[str], class_features: torch.Tensor | None = None,
                         templates: Sequence[str] = (DEFAULT_TEMPLATE,), copy_weights: bool = True) -> "Classifier":
    """Zero-shot CLIP as a Classifier: the backbone's vision tower and a head of class text embeddings.

    `class_features` ([C, D], unit norm) defaults to the templates' embeddings. With copy_weights
    False the classifier shares the backbone's (frozen) vision tower instead of copying it.
    """
    from coft.prompts import class_text_features

    if class_features is None:
        class_features = class_text_features(backbone, class_names, templates)
    visual = copy.deepcopy(backbone.model.visual) if copy_weights else backbone.model.visual
    member = ImageClassifier(visual, text_head(class_features.to(backbone.device), backbone.logit_scale))
    return Classifier([member], class_names, backbone.model_cfg, backbone.preprocess_cfg)


@dataclass
class Predictions:
    class_names: list[str]
    probabilities: torch.Tensor  # [N, C]

    @property
    def indices(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.indices.tolist()]

    @property
    def confidences(self) -> list[float]:
        return self.probabilities.max(dim=1).values.tolist()

    def top_k(self, k: int) -> list[list[tuple[str, float]]]:
        values, indices = self.probabilities.topk(min(k, self.probabilities.shape[1]), dim=1)
        return [[(self.class_names[i], float(v)) for v, i in zip(vs, idx)]
                for vs, idx in zip(values.tolist(), indices.tolist())]


class Classifier(nn.Module):
    def __init__(self, members: Sequence[ImageClassifier], class_names: Sequence[str], model_cfg: dict[str, Any],
                 preprocess_cfg: dict[str, Any], metadata: dict[str, Any] | None = None):
        super().__init__()
        if not members:
            raise ValueError("a classifier needs at least one member")
        self.members = nn.ModuleList(members)
        self.class_names = list(class_names)
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.metadata = dict(metadata or {})
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mean of the members' class probabilities, [B, C]."""
        return torch.stack([member(pixels).float().softmax(dim=-1) for member in self.members]).mean(dim=0)

    def transform(self):
        """open_clip's test-time transform of one PIL image (what an exported model's user applies)."""
        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    def batch_transform(self) -> EvalTransform:
        """The same transform over a list of images, into one batch of inputs (the serving path's)."""
        return EvalTransform(self.preprocess_cfg)

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C] float probabilities on the CPU of test-time views (`transform()` of each image),
        in one forward pass on this classifier's device, mixed precision where it has it."""
        with autocast(self.device):
            return self(pixels.to(self.device, non_blocking=True)).float().cpu()

    def predict(self, images: Sequence[Image.Image] | ImageSource, batch_size: int = 64,
                progress: ProgressCallback | None = None) -> Predictions:
        """Class probabilities of PIL images (this artifact's own test-time transform), or of an
        ImageSource's test-time views (a run's decoded-image cache). `progress` hears of every batch
        (stage "predict", with an ETA): a large set is a job of its own."""
        if len(images) == 0:
            return Predictions(self.class_names, torch.empty(0, len(self.class_names)))
        report = ProgressTracker(progress, {"predict": 1.0}).reporter("predict")
        done = 0

        def counted(count: int) -> None:
            nonlocal done
            done += count
            report(done / len(images))

        if isinstance(images, ImageSource):
            batches = []
            for positions in in_order(len(images), batch_size):
                batches.append(self.probabilities(images.test_view(positions)))
                counted(len(positions))
            return Predictions(self.class_names, torch.cat(batches))
        return Predictions(self.class_names, map_batches(self.probabilities, images, self.batch_transform(), batch_size,
                                                         self.device, on_batch=counted))

    def member(self, index: int) -> "Classifier":
        """A classifier of one member alone: half the cost of the ensemble."""
        return Classifier([self.members[index]], self.class_names, self.model_cfg, self.preprocess_cfg,
                          {**self.metadata, "member": index})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact directory atomically: readers see the old one or the whole new one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            state = {f"members.{k}": v.detach().contiguous().cpu() for k, v in self.members.state_dict().items()}
            save_file(state, str(staging / WEIGHTS_FILE))
            metadata = {
                "format": ARTIFACT_FORMAT,
                "version": ARTIFACT_VERSION,
                "class_names": self.class_names,
                "num_members": len(self.members),
                "model_cfg": self.model_cfg,
                "preprocess_cfg": self.preprocess_cfg,
                **self.metadata,
            }
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=_json_default) + "\n")
            if path.exists():
                retired = path.with_name(f".{path.name}.old")
                shutil.rmtree(retired, ignore_errors=True)
                path.rename(retired)
                staging.rename(path)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "Classifier":
        path = Path(path)
        try:
            metadata = json.loads((path / METADATA_FILE).read_text())
        except (OSError, ValueError) as error:  # no classifier.json (not an artifact), or not JSON
            raise ValueError(f"{path} is not a coft classifier artifact ({error})") from error
        if not isinstance(metadata, dict) or metadata.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{path} is not a coft classifier artifact")
        if metadata.get("version", 0) > ARTIFACT_VERSION:
            raise ValueError(f"{path} was written by a newer coft (artifact version {metadata['version']})")
        state = load_file(str(path / WEIGHTS_FILE))
        num_classes, embed_dim = len(metadata["class_names"]), metadata["model_cfg"]["embed_dim"]
        members = [ImageClassifier(build_vision_tower(metadata["model_cfg"]), nn.Linear(embed_dim, num_classes))
                   for _ in range(metadata["num_members"])]
        classifier = cls(members, metadata["class_names"], metadata["model_cfg"], metadata["preprocess_cfg"],
                         {k: v for k, v in metadata.items() if k not in _STRUCTURAL_KEYS})
        classifier.load_state_dict(state, strict=True)
        return classifier.to(torch.device(device) if device is not None else default_device()).eval()


_STRUCTURAL_KEYS = {"format", "version", "class_names", "num_members", "model_cfg", "preprocess_cfg"}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

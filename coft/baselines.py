"""The baselines CoFT and CoFT+ are measured against, on the same backbone and data
(shared/design/coft-method.md, "Baselines"). Each returns a coft.classifier.Classifier, the artifact
every method produces, so the benchmark scores them all the same way.

Label-free:
- zero-shot CLIP, one template or the template ensemble;
- UPL (Huang et al., 2022): the top-K most confident zero-shot images per class, then a CoOp prompt
  learned on them (one prompt model; UPL's ensemble of several prompt inits is left out);
- FixMatch-style self-training (Sohn et al., 2020), with no labelled loss: a fresh vision tower and
  a text-initialised head, the model's own argmax on a weak view is the target of the CE on a strong
  (RandAugment) view, where its confidence reaches a threshold;
- a plain full fine-tune on the top-K zero-shot pseudo-labels per class (CoFT without Phase I and
  the filter).
With labels (k shots per class, to place the label-free methods against supervision):
- CoOp (Zhou et al., 2022): a learned prompt context on the frozen CLIP;
- a linear probe (Radford et al., 2021): L2-regularised logistic regression on frozen image features.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from coft.augment import StrongAugmentation, train_augmentation
from coft.backbone import Backbone
from coft.classifier import Classifier, ImageClassifier, zero_shot_classifier
from coft.config import DEFAULT_TEMPLATE, Phase2Config
from coft.image_cache import ImageSource, Subset, cached_images
from coft.phase2 import fine_tune, fresh_classifier
from coft.prompts import TEMPLATE_ENSEMBLE, PromptLearner, class_text_features
from coft.pseudo_labels import top_k_per_class
from coft.training import Optimiser, epoch_batches, epochs_for, in_order, steps_per_epoch

# CoOp's schedules (its configs vit_b16_ep50 / ep100 / ep200): fewer shots, fewer epochs.
COOP_EPOCHS = {1: 50, 2: 50, 4: 100, 8: 100, 16: 200}


@dataclass
class CoOpConfig:
    """CoOp's recipe: M = 16 context tokens, SGD lr 0.002, batch 32, cosine, random crop + flip."""

    context_tokens: int = 16
    init_std: float = 0.02
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int | None = None  # None: COOP_EPOCHS by shots per class (50 for UPL's pseudo-labels)
    min_steps: int = 0  # at least this many optimiser steps, however few the images (more epochs)
    batch_size: int = 32
    crop_scale_min: float = 0.5
    hflip: bool = True


@dataclass
class UPLConfig:
    top_k: int = 16  # pseudo-labelled images per class
    template: str = DEFAULT_TEMPLATE
    coop: CoOpConfig = None  # type: ignore[assignment]  # default: CoOpConfig(epochs=50), UPL's schedule

    def __post_init__(self):
        if self.coop is None:
            self.coop = CoOpConfig(epochs=50)


@dataclass
class FixMatchConfig:
    """FixMatch's threshold and RandAugment; the spec's Phase II optimiser (crop 0.5-1) at a lower lr.

    With nothing but its own confident predictions to learn from, the model drifts onto one class at
    Phase II's rates: 12.3% on the development tasks at lr 5e-4 (distribution alignment on), 23.4% at
    1e-4, 44.6% at 2e-5 (+32.3 +- 4.6 over 5e-4, 3 tasks x 3 seeds; benchmarks/RESULTS.md): 2e-5,
    the best of that grid, is its default.
    """

    threshold: float = 0.95  # FixMatch's confidence threshold on the weak view
    lr: float = 2e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    batch_size: int = 64
    crop_scale_min: float = 0.5
    hflip: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: int = 10
    template: str = DEFAULT_TEMPLATE
    # The head is Phase II's (coft.phase2.fresh_classifier), head_scale x the class text embeddings:
    # the threshold and lr then mean the same for any CLIP temperature. None: the backbone's logit scale.
    head_scale: float | None = 25.0
    # ReMixMatch's distribution alignment: weak-view probabilities times (uniform / running mean of the
    # model's predictions), renormalised, before the argmax and threshold. Without labels to anchor it,
    # plain self-training drifts onto a few classes; this keeps the targets' class marginal even.
    distribution_alignment: bool = False
    alignment_momentum: float = 0.99  # of the running mean of predictions


@dataclass
class TopKFineTuneConfig:
    """A plain full fine-tune on the top-K zero-shot pseudo-labels per class: CoFT's Phase II recipe
    (fresh tower, text head, optimiser, augmentation), trained on S* alone with its zero-shot labels,
    for as many steps as CoFT's Phase II takes on the same images (`steps` None), so that what CoFT
    adds over it is Phase I and the filter, not a longer schedule."""

    top_k: int = 16
    template: str = DEFAULT_TEMPLATE
    phase2: Phase2Config = field(default_factory=Phase2Config)
    steps: int | None = None


@dataclass
class LinearProbeConfig:
    """CLIP's linear-probe recipe: logistic regression, L-BFGS, sklearn's C (inverse L2 strength).

    C = 0.316 is the value of CLIP's own linear-probe example; the CLIP paper tunes C on a validation
    split, which a k-shot setting does not have, and the test split must never serve as one.
    """

    inverse_l2: float = 0.316
    max_iter: int = 1000


# --------------------------------------------------------------------------- zero-shot


def zero_shot(backbone: Backbone, class_names: Sequence[str], ensemble: bool = False,
              template: str = DEFAULT_TEMPLATE) -> Classifier:
    """Zero-shot CLIP with one template, or the built-in template ensemble."""
    templates = TEMPLATE_ENSEMBLE if ensemble else [template]
    return zero_shot_classifier(backbone, class_names, class_text_features(backbone, class_names, templates))


# --------------------------------------------------------------------------- CoOp and UPL


def train_coop(backbone: Backbone, class_names: Sequence[str], images: Sequence[Image.Image] | ImageSource,
               indices: torch.Tensor, labels: torch.Tensor, config: CoOpConfig, seed: int, epochs: int) -> Classifier:
    """Learn a CoOp context on images[indices] with `labels`; the classifier is the frozen vision tower
    and a head of the learned class prompts (what CoOp computes at test time, cached)."""
    source = as_source(images, backbone)
    indices, labels = indices.cpu(), labels.cpu()
    epochs = epochs_for(len(indices), config.batch_size, epochs, config.min_steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        prompts = PromptLearner(backbone, class_names, config.context_tokens, config.init_std, generator)
        augmentation = train_augmentation(backbone.preprocess_cfg, config.crop_scale_min, config.hflip)
        optimiser = Optimiser([prompts.positive], lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay, device=backbone.device,
                              total_steps=epochs * steps_per_epoch(len(indices), config.batch_size))
        scale = backbone.logit_scale
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for positions in epoch_batches(len(indices), config.batch_size, order):
                pixels = source.view(source.pixels(indices[positions]), augmentation)
                batch_labels = labels[positions].to(backbone.device, non_blocking=True)
                with backbone.autocast():
                    with torch.no_grad():  # the vision tower is frozen in CoOp
                        image = F.normalize(backbone.model.encode_image(pixels).float(), dim=-1)
                    loss = F.cross_entropy(scale * image @ prompts("positive").float().T, batch_labels)
                optimiser.step(loss)
        with torch.no_grad():
            class_features = prompts("positive").float()
    return zero_shot_classifier(backbone, class_names, class_features)


def coop(backbone: Backbone, class_names: Sequence[str], images: Sequence[Image.Image] | ImageSource,
         labels: torch.Tensor, config: CoOpConfig | None = None, seed: int = 0) -> Classifier:
    """CoOp on labelled images (the k shots per class, as chosen by `sample_shots`)."""
    config = config or CoOpConfig()
    shots = int(torch.bincount(labels).max()) if len(labels) else 1
    epochs = config.epochs or COOP_EPOCHS.get(shots, 200 if shots > 16 else 50)
    return train_coop(backbone, class_names, images, torch.arange(len(images)), labels, config, seed, epochs)


def upl(backbone: Backbone, class_names: Sequence[str], images: Sequence[Image.Image] | ImageSource,
        config: UPLConfig | None = None, seed: int = 0, batch_size: int = 128) -> Classifier:
    """UPL: CoOp on the top-K most confident zero-shot pseudo-labels per class."""
    config = config or UPLConfig()
    images = as_source(images, backbone)  # decoded once, for the pseudo-labels and the training
    text = class_text_features(backbone, class_names, [config.template])
    features = encode_images(backbone, images, batch_size)
    probabilities = (backbone.logit_scale * features @ text.to(features.device).T).softmax(dim=1).cpu()
    indices, labels = top_k_per_class(probabilities, config.top_k)
    return train_coop(backbone, class_names, images, indices, labels, config.coop, seed, config.coop.epochs or 50)


def top_k_fine_tune(backbone: Backbone, class_names: Sequence[str], images: Sequence[Image.Image] | ImageSource,
                    config: TopKFineTuneConfig | None = None, seed: int = 0) -> tuple[Classifier, dict]:
    """Fine-tune a fresh tower + text head on the top-K zero-shot images per class; returns it and
    how many images and epochs it trained on."""
    config = config or TopKFineTuneConfig()
    source = as_source(images, backbone)
    text = class_text_features(backbone, class_names, [config.template])
    probabilities = (backbone.logit_scale * encode_images(backbone, source) @ text.T).softmax(dim=1).cpu()
    indices, labels = top_k_per_class(probabilities, config.top_k)
    batch_size = config.phase2.batch_size
    steps = config.steps or config.phase2.epochs * steps_per_epoch(len(source), batch_size)
    epochs = epochs_for(len(indices), batch_size, 1, steps)
    model = fresh_classifier(backbone, text, config.phase2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fine_tune(model, backbone, Subset(source, indices), labels, torch.ones(len(indices), dtype=torch.bool),
                  config.phase2.model_copy(update={"epochs": epochs}), seed)
    classifier = Classifier([model], class_names, backbone.model_cfg, backbone.preprocess_cfg)
    return classifier, {"images": len(indices), "epochs": epochs}


# --------------------------------------------------------------------------- linear probe


def linear_probe(backbone: Backbone, class_names: Sequence[str], images: Sequence[Image.Image] | ImageSource,
                 labels: torch.Tensor, config: LinearProbeConfig | None = None, batch_size: int = 128) -> Classifier:
    """Logistic regression on the frozen, unit-norm image embeddings; sklearn's objective
    C * sum CE + ||W||^2 / 2, divided by C*N: mean CE + ||W||^2 / (2 C N). The bias is not penalised."""
    config = config or LinearProbeConfig()
    features = encode_images(backbone, images, batch_size).float()
    labels = labels.to(features.device)
    head = nn.Linear(features.shape[1], len(class_names)).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    strength = 1.0 / (config.inverse_l2 * len(features))
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=config.max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + 0.5 * strength * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    member = ImageClassifier(copy.deepcopy(backbone.model.visual), head.requires_grad_(False))
    return Classifier([member], class_names, backbone.model_cfg, backbone.preprocess_cfg)


# --------------------------------------------------------------------------- FixMatch-style self-training


def fixmatch(backbone: Backbone, class_names: Sequence[str], images: Sequence[Image.Image] | ImageSource,
             config: FixMatchConfig | None = None, seed: int = 0) -> tuple[Classifier, dict]:
    """Self-training of a fresh vision tower + zero-shot head; returns it and how many targets passed."""
    config = config or FixMatchConfig()
    source = as_source(images, backbone)
    text = class_text_features(backbone, class_names, [config.template])
    model = fresh_classifier(backbone, text, Phase2Config(head_scale=config.head_scale))
    model.to(backbone.device).train().requires_grad_(True)
    weak = train_augmentation(backbone.preprocess_cfg, config.crop_scale_min, config.hflip)
    strong = StrongAugmentation(backbone.preprocess_cfg, config.crop_scale_min, config.hflip,
                                config.randaugment_ops, config.randaugment_magnitude)
    optimiser = Optimiser(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                          total_steps=config.epochs * steps_per_epoch(len(source), config.batch_size),
                          device=backbone.device)
    order = torch.Generator().manual_seed(seed)
    passed = torch.zeros((), device=backbone.device)
    seen = 0
    prediction_mean = torch.full((len(class_names),), 1.0 / len(class_names), device=backbone.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(config.epochs):
            for positions in epoch_batches(len(source), config.batch_size, order):
                pixels = source.pixels(positions)
                weak_view, strong_view = source.view(pixels, weak), source.view(pixels, strong)
                with backbone.autocast():
                    with torch.no_grad():
                        probabilities = model(weak_view).float().softmax(dim=1)
                        if config.distribution_alignment:
                            probabilities = align_distribution(probabilities, prediction_mean,
                                                               config.alignment_momentum)
                        confidence, target = probabilities.max(dim=1)
                    keep = confidence >= config.threshold
                    passed, seen = passed + keep.sum(), seen + len(keep)
                    # A baseline may wait for the device: only the confident samples are forwarded.
                    if keep.any():
                        loss = F.cross_entropy(model(strong_view[keep]).float(), target[keep])
                if keep.any():
                    optimiser.step(loss)
                else:
                    optimiser.skip()
    model.eval().requires_grad_(False)
    classifier = Classifier([model], class_names, backbone.model_cfg, backbone.preprocess_cfg)
    return classifier, {"mask_rate": float(passed) / max(seen, 1)}


def align_distribution(probabilities: torch.Tensor, prediction_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """ReMixMatch's distribution alignment towards a uniform class marginal. Updates the running
    `prediction_mean` in place with this batch, then returns p / mean, renormalised per row."""
    prediction_mean.mul_(momentum).add_(probabilities.mean(dim=0), alpha=1 - momentum)
    aligned = probabilities / prediction_mean
    return aligned / aligned.sum(dim=1, keepdim=True)


# --------------------------------------------------------------------------- helpers


def as_source(images: Sequence[Image.Image] | ImageSource, backbone: Backbone) -> ImageSource:
    """PIL images decoded once into a temporary cache; an ImageSource as it is."""
    if isinstance(images, ImageSource):
        return images
    return cached_images(images, backbone.preprocess_cfg, backbone.device)


@torch.no_grad()
def encode_images(backbone: Backbone, images: Sequence[Image.Image] | ImageSource,
                  batch_size: int = 128) -> torch.Tensor:
    """[N, D] unit-norm image embeddings of the frozen backbone, test-time view, on its device."""
    source = as_source(images, backbone)
    features = []
    for positions in in_order(len(source), batch_size):
        with backbone.autocast():
            embedded = backbone.model.encode_image(source.test_view(positions))
        features.append(F.normalize(embedded.float(), dim=-1))
    return torch.cat(features)


def sample_shots(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of `shots` examples per class drawn at random (all of a class that has fewer)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero(as_tuple=True)[0]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values

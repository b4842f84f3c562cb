"""Phase II: full fine-tuning of a fresh vision tower + linear head on a clean set (paper Sec. 3.2, Eq. 7).

Every epoch walks all of U, as the method spec fixes; the cross-entropy sees only the samples the
other model validated. Without a term that uses them, rejected samples are not even read: they
would add cost and change nothing (the vision transformer has no batch statistics). CoFT+'s
contrastive term (coft.contrastive) uses every sample of the batch, clean or rejected.
"""

from __future__ import annotations

import copy

import torch
from torch.optim.swa_utils import AveragedModel

from coft.augment import MixUp, StrongAugmentation, train_augmentation
from coft.backbone import Backbone
from coft.classifier import ImageClassifier, text_head
from coft.config import Phase2Config
from coft.contrastive import MomentumContrast
from coft.image_cache import ImageSource, training_inputs
from coft.losses import classification_loss
from coft.openclip import patch_dropout, vision_depths
from coft.progress import StageReport
from coft.training import LossMeans, Optimiser, epoch_batches, steps_per_epoch


def fresh_classifier(backbone: Backbone, text_features: torch.Tensor, config: Phase2Config) -> ImageClassifier:
    """A copy of the backbone's pre-trained vision tower and a head of the class text embeddings.

    The head is `head_scale` x the embeddings (a zero-shot classifier at that temperature), not
    CLIP's own logit scale: the scale multiplies every gradient into the tower, so a learning rate
    would mean a 4x larger step for a CLIP at 100 than for the proxy at 27. With a fixed scale
    a config means the same update for any CLIP. `head_scale` None uses the logit scale (the
    head then reproduces zero-shot CLIP's probabilities exactly).
    """
    head = text_head(text_features.to(backbone.device), config.head_scale or backbone.logit_scale)
    if config.head_init == "random":
        torch.nn.init.normal_(head.weight, std=0.01)
    return ImageClassifier(copy.deepcopy(backbone.model.visual), head)


def parameter_groups(model: ImageClassifier, config: Phase2Config) -> list[dict]:
    """The optimiser's parameter groups, each with its own lr: `layer_decay` per tower depth, `head_lr_scale`
    for the head. One group of every weight at `lr` where both are 1 (the spec)."""
    head = {"params": list(model.head.parameters()), "lr": config.lr * config.head_lr_scale}
    if config.layer_decay == 1.0:
        return [{"params": list(model.visual.parameters()), "lr": config.lr}, head]
    depths, top = vision_depths(model.visual)
    layers: dict[int, list[torch.nn.Parameter]] = {}
    for name, parameter in model.visual.named_parameters():
        layers.setdefault(depths[name], []).append(parameter)
    return [*({"params": parameters, "lr": config.lr * config.layer_decay ** (top - depth)}
              for depth, parameters in sorted(layers.items())), head]


def check_options(config: Phase2Config, contrastive: bool) -> None:
    """Refuse a Phase II config the run cannot honour: adapt() asks before a job does any work,
    fine_tune() again before it trains."""
    if config.mixup and contrastive:
        raise ValueError("phase2.mixup is CoFT's: CoFT+'s contrastive term needs the unmixed views")


def s_star_weights(num_images: int, s_star: torch.Tensor, weight: float) -> torch.Tensor | None:
    """One CE weight per image: `weight` for S*'s images (`phase2.s_star_weight`), 1 for the rest;
    None when every weight is 1 (the spec's plain mean)."""
    if weight == 1.0:
        return None
    weights = torch.ones(num_images)
    weights[s_star] = weight
    return weights


# A batch's CE on fewer clean samples than this is skipped: a BatchNorm tower (timm, ResNet) cannot
# train on one sample, and for any tower a one-sample step is noise (as epoch_batches' trailing one).
MIN_CE_SAMPLES = 2


def fine_tune(model: ImageClassifier, backbone: Backbone, images: ImageSource, labels: torch.Tensor,
              clean: torch.Tensor, config: Phase2Config, seed: int, report: StageReport | None = None,
              contrastive: MomentumContrast | None = None, weights: torch.Tensor | None = None) -> list[dict]:
    """Train every weight of `model` with CE on the clean samples; returns per-epoch losses.

    `backbone` gives the device and the preprocessing of the Phase II architecture. `contrastive`
    (CoFT+) adds its InfoNCE term on every sample of each batch. `weights` (one per image) weigh
    each clean sample's CE.
    """
    device = backbone.device
    model.to(device)
    start = ({name: value.detach().clone() for name, value in model.state_dict().items()}
             if config.weight_interpolation < 1.0 else None)
    model.train().requires_grad_(True)
    augmentation = None
    if config.augment and config.randaugment_ops:
        augmentation = StrongAugmentation(backbone.preprocess_cfg, config.crop_scale_min, config.hflip,
                                          config.randaugment_ops, config.randaugment_magnitude)
    elif config.augment:
        augmentation = train_augmentation(backbone.preprocess_cfg, config.crop_scale_min, config.hflip)
    check_options(config, contrastive is not None)
    mixup = MixUp(config.mixup) if config.mixup else None
    total_steps = max(1, config.epochs * steps_per_epoch(len(images), config.batch_size))
    optimiser = Optimiser(parameter_groups(model, config), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, total_steps=total_steps, device=device)
    clean, labels = clean.bool().cpu(), labels.cpu()
    order = torch.Generator().manual_seed(seed)
    history, step = [], 0
    # SWA's mean starts once (1 - swa_fraction) of the steps are done; buffers (BatchNorm's) are averaged alike.
    averaged = AveragedModel(model, use_buffers=True) if config.swa_fraction else None
    average_from = total_steps - int(round(config.swa_fraction * total_steps))
    for epoch in range(config.epochs):
        means = LossMeans()
        for positions in epoch_batches(len(images), config.batch_size, order):
            step += 1
            rows = clean[positions].nonzero().squeeze(1)  # the batch's clean rows
            if len(rows) < MIN_CE_SAMPLES:  # too few for a CE step: the batch counts as all rejected
                rows = rows[:0]
            kept = positions[rows]
            # Copies to the device never wait: a blocking one would stall the host until the GPU drains.
            targets = labels[kept].to(device, non_blocking=True)
            kept_weights = None if weights is None else weights[kept].to(device, non_blocking=True)
            if contrastive is None:
                if len(kept) == 0:
                    optimiser.skip()
                else:
                    with backbone.autocast(), patch_dropout(model.visual, config.patch_dropout):
                        inputs = training_inputs(images, kept, augmentation)
                        if mixup is not None:
                            inputs, targets, kept_weights = mixup(inputs, targets, model.head.out_features,
                                                                  kept_weights)
                        ce = classification_loss(model(inputs).float(), targets, config.gce_q, kept_weights)
                    optimiser.step(ce)
                    means.add("ce", ce, len(kept))
            else:
                pixels = images.pixels(positions)
                with backbone.autocast(), patch_dropout(model.visual, config.patch_dropout):
                    queries, logits = _queries_and_logits(model, images, positions, pixels, rows, augmentation,
                                                          contrastive)
                    nce = contrastive(model.visual, queries, images.view(pixels, contrastive.augmentation))
                    loss = nce
                    if len(kept):
                        ce = classification_loss(logits.float(), targets, config.gce_q, kept_weights)
                        loss = loss + ce
                        means.add("ce", ce, len(kept))
                optimiser.step(loss)
                means.add("extra", nce)
            if averaged is not None and step > average_from:
                averaged.update_parameters(model)
            if report is not None:
                report(step / total_steps, f"epoch {epoch + 1}/{config.epochs}")
        # None, not 0.0, for an epoch without a single clean sample: nothing was fitted.
        history.append({"epoch": epoch + 1, **means.read(*(("ce", "extra") if contrastive else ("ce",)))})
    model.eval().requires_grad_(False)
    if averaged is not None and int(averaged.n_averaged) > 0:
        model.load_state_dict(averaged.module.state_dict())
    if start is not None:
        interpolate_weights(model, start, config.weight_interpolation)
    return history


def _queries_and_logits(model: ImageClassifier, images: ImageSource, positions: torch.Tensor, pixels: torch.Tensor,
                        rows: torch.Tensor, augmentation, contrastive: MomentumContrast):
    """CoFT+: the contrastive queries of every sample in the batch and the CE logits of its clean `rows`,
    from two forward passes with gradient (the spec) or one shared view (coft_plus.shared_view)."""
    clean = rows.to(pixels.device, non_blocking=True)
    if contrastive.shared_view == "none":  # the CE on the Phase II view, the query on a MoCo v2 view
        logits = (model(training_inputs(images, positions[rows], augmentation, pixels[clean])) if len(rows)
                  else None)
        return model.embed(images.view(pixels, contrastive.augmentation)), logits
    if contrastive.shared_view == "ce":  # the query is the embedding of the CE's Phase II view
        embeddings = model.embed(training_inputs(images, positions, augmentation, pixels))
    else:  # "moco": the CE reads the query's MoCo v2 view
        embeddings = model.embed(images.view(pixels, contrastive.augmentation))
    return embeddings, model.classify(embeddings[clean])


def interpolate_weights(model: torch.nn.Module, start: dict[str, torch.Tensor], fraction: float) -> None:
    """Set every floating-point weight to fraction * trained + (1 - fraction) * start, in place.

    With `start` the pre-trained tower and zero-shot head, this is WiSE-FT: the interpolated model
    keeps what fine-tuning learned from the (noisy) clean set while staying near the features that
    pre-training made robust.
    """
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                value.lerp_(start[name].to(value.device, value.dtype), 1.0 - fraction)

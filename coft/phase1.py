"""Phase I: parameter-efficient fine-tuning of one of the two models on S* (paper Sec. 3.1).

The CLIP weights stay frozen; a model learns a positive and a negative prompt context (shared by
all classes) and visual prompt tokens. L1 teaches the positive prompts the pseudo-labels; L2 teaches
the negative prompt to sit below the positive one for the given label and above it for a random
other label, so that s+_y > s-_y reads as "label y is clean for this image".
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coft.augment import train_augmentation
from coft.backbone import Backbone
from coft.config import Phase1Config
from coft.image_cache import ImageSource, training_inputs
from coft.losses import confusable_other_labels, negative_loss, positive_loss, random_other_labels
from coft.progress import StageReport
from coft.prompts import PromptLearner
from coft.training import LossMeans, Optimiser, epoch_batches, epochs_for, history_every, in_order, steps_per_epoch
from coft.vpt import prompted_visual


class PromptModel(nn.Module):
    """Frozen CLIP + learnable positive/negative text prompts + visual prompts. Only those train."""

    def __init__(self, backbone: Backbone, class_names: Sequence[str], config: Phase1Config, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.prompts = PromptLearner(backbone, class_names, config.context_tokens, config.context_init_std, generator,
                                     config.context_init)
        self.visual = prompted_visual(backbone.model.visual, backbone.model_cfg["embed_dim"], config.vpt_tokens,
                                      config.vpt_deep, config.vpt_init_std, generator)
        self.scale = backbone.logit_scale

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)

    def similarities(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s+, s-): [B, C] cosine similarities to the positive and negative prompts."""
        image = self.image_features(pixels)
        text_pos, text_neg = self.prompts.both()
        return cosines(image, text_pos), cosines(image, text_neg)


def train_prompt_model(backbone: Backbone, class_names: Sequence[str], images: ImageSource, indices: torch.Tensor,
                       labels: torch.Tensor, config: Phase1Config, seed: int,
                       report: StageReport | None = None) -> tuple[PromptModel, list[dict]]:
    """Train a fresh PromptModel on images[indices] with pseudo-labels; returns it and per-epoch losses."""
    model = PromptModel(backbone, class_names, config, seed)
    model.train()
    anchor = None  # KgCoOp's: the positive text features the training starts from, when L1 pulls back to them
    if config.text_anchor_weight > 0:
        with torch.no_grad():
            anchor = model.prompts.both()[0].float()
    augmentation = (train_augmentation(backbone.preprocess_cfg, config.crop_scale_min, config.hflip)
                    if config.augment else None)
    indices, labels = indices.cpu(), labels.cpu()
    epochs = epochs_for(len(indices), config.batch_size, config.epochs, config.min_steps)
    total_steps = max(1, epochs * steps_per_epoch(len(indices), config.batch_size))
    optimiser = Optimiser([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                          momentum=config.momentum, weight_decay=config.weight_decay, total_steps=total_steps,
                          device=backbone.device)
    order = torch.Generator().manual_seed(seed)
    others = torch.Generator().manual_seed(seed + 7919)
    history, step, every = [], 0, history_every(epochs)
    means = LossMeans()
    for epoch in range(epochs):
        for positions in epoch_batches(len(indices), config.batch_size, order):
            pixels = training_inputs(images, indices[positions], augmentation)
            batch_labels = labels[positions].to(backbone.device, non_blocking=True)
            with backbone.autocast():
                l1, l2 = _losses(model, pixels, batch_labels, config, others, anchor=anchor)
            optimiser.step(l1 + config.negative_weight * l2)
            means.add("l1", l1, len(positions))
            means.add("l2", l2, len(positions))
            step += 1
            if report is not None:
                report(step / total_steps, f"epoch {epoch + 1}/{epochs}")
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            history.append({"epoch": epoch + 1, **means.read("l1", "l2")})
            means = LossMeans()
    model.eval()
    return model, history


def cosines(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, C] similarities of unit vectors, in float32 even under autocast.

    The filter's strict s+ > s- compares values near 0.3 that differ by little; bfloat16 resolves
    only about 0.001 there, which would turn small margins into ties or flip them.
    """
    with torch.autocast(device_type=image.device.type, enabled=False):
        return image.float() @ text.float().T


def _losses(model: PromptModel, pixels, labels, config: Phase1Config, generator: torch.Generator | None = None,
            others: torch.Tensor | None = None, anchor: torch.Tensor | None = None):
    """(L1, L2) on a batch; L2's other class yhat is `others`, or drawn as config.negative_classes says.
    With `anchor`, L1 also pulls the positive text features toward it (config.text_anchor_weight)."""
    image = model.image_features(pixels).float()
    text_pos, text_neg = (features.float() for features in model.prompts.both())
    s_pos = cosines(image, text_pos)
    l1 = positive_loss(s_pos, labels, model.scale, config.gce_q)
    if anchor is not None:
        l1 = l1 + config.text_anchor_weight * (text_pos - anchor).square().sum(dim=1).mean()
    if others is None:
        others = (confusable_other_labels(s_pos * model.scale, labels, generator)
                  if config.negative_classes == "confusable"
                  else random_other_labels(labels, text_pos.shape[0], generator))
    # L2 regularises the visual prompts through the image features (kept attached by default), but
    # must not drag the positive prompts, which L1 owns: hence the detached positive text.
    image_l2 = image.detach() if config.detach_image_in_l2 else image
    text_pos_l2 = text_pos.detach() if config.detach_positive_text_in_l2 else text_pos
    l2 = negative_loss(cosines(image_l2, text_pos_l2), cosines(image_l2, text_neg), labels, others, model.scale)
    return l1, l2


@torch.no_grad()
def score_images(model: PromptModel, backbone: Backbone, images: ImageSource, batch_size: int,
                 report: StageReport | None = None,
                 indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s+, s-) [N, C] for every image (or images[indices]), with the test-time view, on the CPU.

    The prompts do not change during a pass, so their text features are computed once for it.
    """
    model.eval()
    indices = torch.arange(len(images)) if indices is None else indices.cpu()
    with backbone.autocast():
        text_pos, text_neg = model.prompts.both()
    scores_pos, scores_neg = [], []
    for positions in in_order(len(indices), batch_size):
        with backbone.autocast():
            image = model.image_features(images.test_view(indices[positions]))
        scores_pos.append(cosines(image, text_pos))
        scores_neg.append(cosines(image, text_neg))
        if report is not None:
            report(int(positions[-1] + 1) / len(indices), "scoring")
    return torch.cat(scores_pos).cpu(), torch.cat(scores_neg).cpu()

"""Phase II: full fine-tuning of a fresh vision tower + linear head on a clean set (paper Sec. 3.2, Eq. 7).

The loader walks all of U every epoch, as the method spec fixes; the cross-entropy sees only the
samples the other model validated. Rejected samples are not even forwarded: without a term that
uses them, they would add cost and change nothing (the vision transformer has no batch statistics).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from coft.backbone import Backbone, grad_scaler
from coft.classifier import ImageClassifier
from coft.config import Phase2Config
from coft.loader import training_batches
from coft.progress import StageReport


def fine_tune(model: ImageClassifier, backbone: Backbone, images: Sequence[Image.Image], labels: torch.Tensor,
              clean: torch.Tensor, config: Phase2Config, seed: int, num_workers: int = 0,
              report: StageReport | None = None,
              extra_loss: Callable[[ImageClassifier, torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """Train every weight of `model` with CE on the clean samples; returns per-epoch losses.

    `backbone` gives the device and the preprocessing of the Phase II architecture. `extra_loss`
    (CoFT+'s contrastive term, coft.contrastive.MomentumContrast) gets the model and the indices of
    EVERY sample of the batch, clean or rejected, and its value is added to the CE.
    """
    model.to(backbone.device)
    start = ({name: value.detach().clone() for name, value in model.state_dict().items()}
             if config.weight_interpolation < 1.0 else None)
    model.train().requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    transform = (backbone.train_transform(config.crop_scale_min, config.hflip) if config.augment
                 else backbone.eval_transform())
    loader = training_batches(images, transform, config.batch_size, seed, labels=labels, num_workers=num_workers)
    total_steps = max(1, config.epochs * len(loader))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    scaler = grad_scaler(backbone.device)
    clean = clean.bool()
    history, step = [], 0
    for epoch in range(config.epochs):
        total, seen, extra_total, extra_steps = 0.0, 0, 0.0, 0
        for pixels, batch_labels, indices in loader:
            step += 1
            keep = clean[indices]
            if keep.any() or extra_loss is not None:
                loss = torch.zeros((), device=backbone.device)
                if keep.any():
                    pixels, batch_labels = pixels[keep].to(backbone.device), batch_labels[keep].to(backbone.device)
                    with backbone.autocast():
                        ce = F.cross_entropy(model(pixels).float(), batch_labels)
                    loss = loss + ce
                    total += ce.item() * len(pixels)
                    seen += len(pixels)
                if extra_loss is not None:
                    with backbone.autocast():
                        extra = extra_loss(model, indices)
                    loss = loss + extra
                    extra_total += extra.item()
                    extra_steps += 1
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            schedule.step()
            if report is not None:
                report(step / total_steps, f"epoch {epoch + 1}/{config.epochs}")
        # None, not 0.0, for an epoch without a single clean sample: nothing was fitted.
        history.append({"epoch": epoch + 1, "ce": total / seen if seen else None})
        if extra_loss is not None:
            history[-1]["extra"] = extra_total / extra_steps if extra_steps else None
    model.eval().requires_grad_(False)
    if start is not None:
        interpolate_weights(model, start, config.weight_interpolation)
    return history


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

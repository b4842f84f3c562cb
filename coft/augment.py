"""The training augmentations, as modules over whole batches on the model's device.

Every module here maps a batch of cached train rows (float in [0, 1], [B, 3, H, W], coft.image_cache)
to the model's normalised input [B, 3, h, w]. They are kornia augmentations with independent
random parameters for every image of the batch, so a batch of 64 costs a handful of tensor
operations on the device instead of 64 trips through PIL on one CPU thread.

The recipes are the method spec's: RandomResizedCrop (scale from the config, torchvision's aspect
range 3/4-4/3) and a horizontal flip for Phase I and II; MoCo v2's two views for CoFT+ (crop 0.2-1,
colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2 with p 0.5, flip);
RandAugment for FixMatch's strong view. MixUp (an option of Phase II) mixes whole samples: images,
their labels and their weights.
"""

from __future__ import annotations

from typing import Any

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment
from torch import nn

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's and the spec's RandomResizedCrop aspect range


def input_size(preprocess_cfg: dict[str, Any]) -> tuple[int, int]:
    """The model's input (height, width)."""
    size = preprocess_cfg["size"]
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def _resample(preprocess_cfg: dict[str, Any]) -> str:
    return "BILINEAR" if preprocess_cfg.get("interpolation") == "bilinear" else "BICUBIC"


def normalize(preprocess_cfg: dict[str, Any]) -> K.Normalize:
    """The model's normalisation (mean, std), the last step of every view."""
    return K.Normalize(mean=torch.tensor(preprocess_cfg["mean"]), std=torch.tensor(preprocess_cfg["std"]))


def _crop(preprocess_cfg: dict[str, Any], scale_min: float) -> K.RandomResizedCrop:
    return K.RandomResizedCrop(input_size(preprocess_cfg), scale=(scale_min, 1.0), ratio=CROP_RATIO,
                               resample=_resample(preprocess_cfg), align_corners=False)


def train_augmentation(preprocess_cfg: dict[str, Any], crop_scale_min: float, hflip: bool) -> nn.Module:
    """Phase I and II: RandomResizedCrop(scale crop_scale_min-1) and, where mirroring keeps the class, a flip."""
    steps: list[nn.Module] = [_crop(preprocess_cfg, crop_scale_min)]
    if hflip:
        steps.append(K.RandomHorizontalFlip())
    return K.AugmentationSequential(*steps, normalize(preprocess_cfg))


def moco_v2_augmentation(preprocess_cfg: dict[str, Any], hflip: bool = True) -> nn.Module:
    """MoCo v2's view: crop 0.2-1, colour jitter (p 0.8), grayscale (p 0.2), blur (p 0.5), flip."""
    height, _ = input_size(preprocess_cfg)
    kernel = max(3, int(0.1 * height) // 2 * 2 + 1)  # ~10% of the side, odd, as in MoCo v2
    steps: list[nn.Module] = [
        _crop(preprocess_cfg, 0.2),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=0.5),
    ]
    if hflip:  # off where mirroring changes the class (digits, arrows); the key must still be the same image
        steps.append(K.RandomHorizontalFlip())
    return K.AugmentationSequential(*steps, normalize(preprocess_cfg))


class StrongAugmentation(nn.Module):
    """FixMatch's strong view: a crop, RandAugment(ops, magnitude), a flip.

    kornia's RandAugment draws its operations once per call, so it is called per image: every image
    gets operations of its own, as FixMatch's per-image RandAugment does.
    """

    def __init__(self, preprocess_cfg: dict[str, Any], crop_scale_min: float, hflip: bool, ops: int, magnitude: int):
        super().__init__()
        self.crop = _crop(preprocess_cfg, crop_scale_min)
        self.rand_augment = RandAugment(n=ops, m=magnitude)
        self.flip = K.RandomHorizontalFlip() if hflip else nn.Identity()
        self.normalize = normalize(preprocess_cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cropped = self.crop(pixels)
        augmented = torch.cat([self.rand_augment(image.unsqueeze(0)) for image in cropped])
        return self.normalize(self.flip(augmented.clamp(0.0, 1.0)))


class MixUp(nn.Module):
    """MixUp (Zhang et al. 2018) on a batch of model inputs: each image becomes (1 - share) x itself +
    share x a random partner from the batch, share ~ U(0, max_share) per image (kornia's RandomMixUpV2);
    its target and its weight are mixed alike. Under noisy labels it keeps the model from memorising
    single wrong ones (the MixUp paper's corrupted-label experiments)."""

    def __init__(self, max_share: float):
        super().__init__()
        self.mix = K.RandomMixUpV2(lambda_val=(0.0, max_share), data_keys=["input", "class"])

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(mixed inputs, class probabilities [B, C], mixed weights or None)."""
        mixed, pairs = self.mix(inputs, torch.arange(len(inputs), device=inputs.device))  # pairs: (self, partner, share)
        partner, share = pairs[:, 1].long(), pairs[:, 2].to(inputs.device)
        one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
        targets = one_hot.lerp(one_hot[partner], share[:, None])
        return mixed, targets, None if weights is None else weights.lerp(weights[partner], share)

"""The batched augmentations (coft.augment) keep the method's recipes, per image, on whole batches.

Each test draws a large batch once and reads back the parameters kornia drew for it (its documented
`_params` replay state), so the ranges are checked on hundreds of independent draws.
"""

from __future__ import annotations

import pytest
import torch

from coft.augment import StrongAugmentation, moco_v2_augmentation, train_augmentation

CFG = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic",
       "resize_mode": "shortest"}
BATCH = 512


def _params(augmentation) -> dict[str, dict[str, torch.Tensor]]:
    return {item.name.rsplit("_", 1)[0]: item.data for item in augmentation._params}


def _crop_boxes(params) -> tuple[torch.Tensor, torch.Tensor]:
    """Area fraction and width/height of every crop (boxes hold inclusive corner pixels)."""
    src = params["RandomResizedCrop"]["src"]
    width = src[:, 1, 0] - src[:, 0, 0] + 1
    height = src[:, 2, 1] - src[:, 0, 1] + 1
    return width * height / (37 * 37), width / height


@pytest.fixture
def pixels() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(1, 3, 37, 37).expand(BATCH, -1, -1, -1).contiguous()  # one image, BATCH times


@pytest.mark.parametrize("scale_min", [0.5, 0.8])
def test_train_augmentation_crops_within_the_configured_scale_and_flips_half(pixels, scale_min):
    augmentation = train_augmentation(CFG, scale_min, hflip=True)
    views = augmentation(pixels)
    assert views.shape == (BATCH, 3, 32, 32)
    params = _params(augmentation)
    area, ratio = _crop_boxes(params)
    # Boxes are whole pixels: allow the rounding of one row and column.
    assert area.min() >= scale_min * (1 - 2 / 37) and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 * (1 - 2 / 37) and ratio.max() <= 4 / 3 * (1 + 2 / 37)
    assert area.std() > 0.05 * (1 - scale_min)  # drawn per image, not once for the batch
    flipped = params["RandomHorizontalFlip"]["batch_prob"].float().mean()
    assert 0.4 < flipped < 0.6
    assert len({tuple(v.flatten().tolist()) for v in views[:32]}) >= 24  # crops are whole pixels: a few may repeat


def test_train_augmentation_without_flip_never_flips(pixels):
    augmentation = train_augmentation(CFG, 0.5, hflip=False)
    augmentation(pixels)
    assert "RandomHorizontalFlip" not in _params(augmentation)


def test_moco_v2_view_follows_the_recipe(pixels):
    augmentation = moco_v2_augmentation(CFG, hflip=True)
    views = augmentation(pixels)
    params = _params(augmentation)
    assert list(params) == ["RandomResizedCrop", "ColorJitter", "RandomGrayscale", "RandomGaussianBlur",
                            "RandomHorizontalFlip", "Normalize"]
    area, _ = _crop_boxes(params)
    assert area.min() >= 0.2 * (1 - 2 / 37) and area.min() < 0.3 and area.max() > 0.9
    jitter = params["ColorJitter"]
    assert 0.7 < jitter["batch_prob"].float().mean() < 0.9
    for name, low, high in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.6, 1.4),
                            ("hue", -0.1, 0.1)):
        factors = jitter[f"{name}_factor"]
        assert factors.min() >= low - 1e-6 and factors.max() <= high + 1e-6, name
        assert factors.max() - factors.min() > 0.8 * (high - low), name  # the whole range is drawn
    assert 0.13 < params["RandomGrayscale"]["batch_prob"].float().mean() < 0.27
    blur = params["RandomGaussianBlur"]
    assert 0.4 < blur["batch_prob"].float().mean() < 0.6
    assert blur["sigma"].min() >= 0.1 and blur["sigma"].max() <= 2.0 and blur["sigma"].std() > 0.3
    assert 0.4 < params["RandomHorizontalFlip"]["batch_prob"].float().mean() < 0.6
    # Gray views are gray, and the others are not all gray.
    gray = params["RandomGrayscale"]["batch_prob"].bool()
    spread = (views - views.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 2, 3))
    assert spread[gray].max() < 1e-4 and spread[~gray].min() > 1e-3


def test_two_moco_views_of_one_image_differ(pixels):
    augmentation = moco_v2_augmentation(CFG, hflip=False)
    first, second = augmentation(pixels[:8]), augmentation(pixels[:8])
    assert first.shape == (8, 3, 32, 32)
    assert all(not torch.allclose(a, b) for a, b in zip(first, second))


def test_strong_augmentation_draws_operations_per_image(pixels):
    torch.manual_seed(1)
    augmentation = StrongAugmentation(CFG, 0.5, hflip=False, ops=2, magnitude=10)
    views = augmentation(pixels[:16])
    assert views.shape == (16, 3, 32, 32)
    assert len({tuple(v.flatten()[:64].tolist()) for v in views}) == 16

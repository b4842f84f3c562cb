"""Batched inference over PIL images: the serving path (`Classifier.predict` on uploads and folders).

Training and the passes inside a run read the decoded-image cache instead (coft.image_cache).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from coft.augment import input_size
from coft.image_cache import eval_geometry


class EvalTransform:
    """open_clip's test-time transform over a batch of PIL images: each image resized and cropped by
    open_clip's rule (`coft.image_cache.eval_geometry`), then one uint8 stack, float conversion and
    normalisation for the whole batch. The same inputs as stacking the per-image transform
    (`image_transform_v2(..., is_train=False)`), without its tensor work per image."""

    def __init__(self, preprocess_cfg: dict[str, Any]):
        self.geometry = eval_geometry(preprocess_cfg, input_size(preprocess_cfg))
        # (x / 255 - mean) / std as one multiply and one subtract over the batch: coft.augment.normalize
        # (kornia) computes the same, with a per-call cost that predict's small batches feel
        std = torch.tensor(preprocess_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = torch.tensor(preprocess_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1) / std

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rows = np.stack([np.asarray(self.geometry(image).convert("RGB"), dtype=np.uint8) for image in images])
        return torch.from_numpy(rows).permute(0, 3, 1, 2).float().mul_(self.scale).sub_(self.shift)


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], images: Sequence[Image.Image],
                transform: EvalTransform, batch_size: int, device: torch.device,
                on_batch: Callable[[int], None] | None = None):
    """Apply fn to every image (the test-time transform, in order); outputs concatenated on the CPU."""
    outputs: list = []
    for start in range(0, len(images), batch_size):
        pixels = transform([images[i] for i in range(start, min(start + batch_size, len(images)))])
        result = fn(pixels.to(device, non_blocking=True))
        outputs.append(tuple(r.float().cpu() for r in result) if isinstance(result, tuple) else result.float().cpu())
        if on_batch is not None:
            on_batch(len(pixels))
    if outputs and isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)

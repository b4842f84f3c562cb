"""Batched inference over PIL images: the serving path (`Classifier.predict` on uploads and folders).

Training and the passes inside a run read the decoded-image cache instead (coft.image_cache).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], images: Sequence[Image.Image],
                transform: Callable, batch_size: int, device: torch.device,
                on_batch: Callable[[int], None] | None = None):
    """Apply fn to every image (the test-time transform, in order); outputs concatenated on the CPU."""
    outputs: list = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(images[i]) for i in range(start, min(start + batch_size, len(images)))])
        result = fn(pixels.to(device, non_blocking=True))
        outputs.append(tuple(r.float().cpu() for r in result) if isinstance(result, tuple) else result.float().cpu())
        if on_batch is not None:
            on_batch(len(pixels))
    if outputs and isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)

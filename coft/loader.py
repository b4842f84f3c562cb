"""Feeding images to models: transformed batches for training, and batched inference over a set."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class TransformedImages(Dataset):
    def __init__(self, images: Sequence[Image.Image], transform: Callable, indices: Sequence[int] | None = None,
                 labels: torch.Tensor | None = None):
        self.images = images
        self.transform = transform
        self.indices = list(range(len(images))) if indices is None else [int(i) for i in indices]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        pixels = self.transform(self.images[index])
        label = -1 if self.labels is None else int(self.labels[position])
        return pixels, label, index


def training_batches(images: Sequence[Image.Image], transform: Callable, batch_size: int, seed: int,
                     indices: Sequence[int] | None = None, labels: torch.Tensor | None = None,
                     num_workers: int = 0) -> DataLoader:
    """Shuffled batches of (pixels, label, index); the seed fixes the order of every epoch."""
    dataset = TransformedImages(images, transform, indices, labels)
    generator = torch.Generator().manual_seed(seed)
    # Drop a trailing batch of one: BatchNorm-free CLIPs would cope, but a 1-sample step is noise.
    drop_last = len(dataset) > batch_size and len(dataset) % batch_size == 1
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=drop_last,
                      num_workers=num_workers, persistent_workers=num_workers > 0)


@torch.no_grad()
def map_batches(fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], images: Sequence[Image.Image],
                transform: Callable, batch_size: int, device: torch.device, num_workers: int = 0,
                on_batch: Callable[[int], None] | None = None):
    """Apply fn to every image (test-time transform, no shuffling); outputs concatenated on the CPU."""
    loader = DataLoader(TransformedImages(images, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    outputs: list = []
    for pixels, _, _ in loader:
        result = fn(pixels.to(device, non_blocking=True))
        outputs.append(tuple(r.float().cpu() for r in result) if isinstance(result, tuple) else result.float().cpu())
        if on_batch is not None:
            on_batch(len(pixels))
    if outputs and isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)

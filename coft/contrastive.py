"""Momentum contrastive learning for CoFT+'s Phase II (paper Sec. 3.3; MoCo v2, He et al. / Chen et al.).

The encoder being fine-tuned embeds one augmented view of every image (the query); an EMA copy of
it, the momentum encoder, embeds a second view (the key). InfoNCE pulls each query to its own key
and away from the keys of earlier batches, kept in a FIFO queue. It uses no label, so it learns
from every image, the rejected ones too: that is how CoFT+ draws on the samples the filter drops.

Spec defaults (coft.config.CoFTPlusConfig): mu 0.999, tau' 0.07, gamma 0.1, queue min(16384, |U|/2)
rounded to the batch, no projection head (the queries are the unit-norm image embeddings the
classifier head reads), the head is not part of the EMA.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms

from coft.backbone import _interpolation, _to_rgb


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter (and buffers copied)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)


class KeyQueue:
    """A FIFO ring of the most recent `size` unit-norm keys, [size, D]. Starts empty: a negative
    that was never an image (MoCo fills its queue with random vectors) teaches nothing."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError("the queue needs room for at least one key")
        self.keys_buffer = torch.zeros(size, dim, device=device)
        self.size = size
        self.pointer = 0  # where the next key goes
        self.filled = 0

    @property
    def keys(self) -> torch.Tensor:
        """The stored keys, [filled, D] (order within the ring does not matter to InfoNCE)."""
        return self.keys_buffer[:self.filled]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(self.keys_buffer.dtype)[-self.size:]  # more than fits: the newest win
        positions = (self.pointer + torch.arange(len(keys), device=self.keys_buffer.device)) % self.size
        self.keys_buffer[positions] = keys
        self.pointer = (self.pointer + len(keys)) % self.size
        self.filled = min(self.size, self.filled + len(keys))


def info_nce(queries: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """-mean log( exp(q.k+/t) / (exp(q.k+/t) + sum_n exp(q.n/t)) ), all vectors unit norm.

    queries, keys [B, D] (row i of keys is the positive of row i of queries); negatives [Q, D].
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, keys, negatives = queries.float(), keys.float(), negatives.float()
        positive = (queries * keys).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, queries @ negatives.T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))


def queue_size(num_images: int, batch_size: int, maximum: int = 16384) -> int:
    """The spec's rule: min(maximum, |U|/2), rounded down to a multiple of the batch, at least one batch."""
    size = min(maximum, num_images // 2)
    return max(batch_size, size // batch_size * batch_size)


def moco_v2_transform(preprocess_cfg: dict[str, Any], hflip: bool = True) -> Callable:
    """MoCo v2's augmentation: crop 0.2-1, colour jitter (p 0.8), grayscale (p 0.2), blur (p 0.5), flip."""
    size = preprocess_cfg["size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    kernel = max(3, int(0.1 * size[0]) // 2 * 2 + 1)  # ~10% of the side, odd, as in MoCo v2
    steps: list[Callable] = [
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0),
                                     interpolation=_interpolation(preprocess_cfg.get("interpolation", "bicubic"))),
        _to_rgb,
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
    ]
    if hflip:  # off where mirroring changes the class (digits, arrows); the key must still be the same image
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(preprocess_cfg["mean"], preprocess_cfg["std"])]
    return transforms.Compose(steps)


class MomentumContrast:
    """The contrastive term of CoFT+'s Phase II, as the `extra_loss` hook of coft.phase2.fine_tune.

    Called once per batch with the model being trained and the indices (into `images`) of every
    sample in the batch, clean or rejected; returns gamma * InfoNCE. Per call: EMA update of the key
    encoder (MoCo does it before computing keys), queries with gradient, keys without, then the
    keys enter the queue, after the loss was formed, so a key is never its own negative.
    """

    def __init__(self, visual: nn.Module, images: Sequence[Image.Image], preprocess_cfg: dict[str, Any],
                 device: torch.device, embed_dim: int, *, momentum: float, temperature: float, weight: float,
                 queue_length: int, hflip: bool = True):
        self.key_encoder = copy.deepcopy(visual).requires_grad_(False).eval()
        self.images = images
        self.transform = moco_v2_transform(preprocess_cfg, hflip)
        self.device = device
        self.momentum, self.temperature, self.weight = momentum, temperature, weight
        self.queue = KeyQueue(queue_length, embed_dim, device)
        self.last_loss: float | None = None

    def __call__(self, model: nn.Module, indices: torch.Tensor) -> torch.Tensor:
        images = [self.images[int(i)] for i in indices]
        queries_pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        keys_pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        visual = model.visual
        queries = F.normalize(visual(queries_pixels).float(), dim=-1)
        with torch.no_grad():
            ema_update(self.key_encoder, visual, self.momentum)
            keys = F.normalize(self.key_encoder(keys_pixels).float(), dim=-1)
        # a copy: the queue is overwritten in place below, and autograd needs the negatives as they were
        loss = info_nce(queries, keys, self.queue.keys.clone(), self.temperature)
        self.queue.push(keys)
        self.last_loss = float(loss.detach())
        return self.weight * loss

"""Momentum contrastive learning for CoFT+'s Phase II (paper Sec. 3.3; MoCo v2, He et al. / Chen et al.).

The encoder being fine-tuned embeds one augmented view of every image (the query); an EMA copy of
it, the momentum encoder, embeds a second view (the key). InfoNCE pulls each query to its own key
and away from the keys of earlier batches, kept in a FIFO queue. It uses no label, so it learns
from every image, the rejected ones too: that is how CoFT+ draws on the samples the filter drops.

Spec defaults (coft.config.CoFTPlusConfig): mu 0.999, tau' 0.07, gamma 0.1, queue min(16384, |U|/2)
rounded to the batch, no projection head (the queries are the unit-norm image embeddings the
classifier head reads), the head is not part of the EMA. The two views are MoCo v2's augmentation
(coft.augment.moco_v2_augmentation), drawn on the device for the whole batch.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coft.augment import moco_v2_augmentation
from coft.openclip import image_embedding


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, for every parameter (buffers are copied).

    One fused update over all tensors (as timm's EMA does): a per-parameter loop would launch
    hundreds of small kernels per step on a GPU."""
    targets = list(target.parameters())
    torch._foreach_lerp_(targets, [s.detach().to(t.dtype) for t, s in zip(targets, source.parameters())],
                         1.0 - momentum)
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


class MomentumContrast:
    """The contrastive term of CoFT+'s Phase II, called by coft.phase2.fine_tune once per batch.

    It gets the encoder being trained, the batch's queries (unit-norm embeddings of every sample,
    clean or rejected, with gradient) and the key view of the same images; returns gamma * InfoNCE.
    Per call: EMA update of the key encoder (MoCo does it before computing keys), keys without
    gradient, the loss, then the keys enter the queue, so a key is never its own negative.

    `shared_view` says whether one forward pass with gradient serves both Phase II terms: "none" (the
    spec: the CE on the Phase II view of the clean samples, the queries on a MoCo v2 view of their
    own), "ce" (the queries are the embeddings of the CE's view) or "moco" (the CE reads the queries'
    MoCo v2 view).
    """

    def __init__(self, visual: nn.Module, embed_dim: int, preprocess_cfg: dict[str, Any], device: torch.device, *,
                 momentum: float, temperature: float, weight: float, queue_length: int, hflip: bool = True,
                 shared_view: str = "none"):
        self.key_encoder = copy.deepcopy(visual).requires_grad_(False).eval()
        self.augmentation = moco_v2_augmentation(preprocess_cfg, hflip)
        self.shared_view = shared_view
        self.momentum, self.temperature, self.weight = momentum, temperature, weight
        self.queue = KeyQueue(queue_length, embed_dim, device)

    def __call__(self, visual: nn.Module, queries: torch.Tensor, key_inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ema_update(self.key_encoder, visual, self.momentum)
            keys = F.normalize(image_embedding(self.key_encoder(key_inputs)).float(), dim=-1)
        # a copy: the queue is overwritten in place below, and autograd needs the negatives as they were
        loss = info_nce(queries, keys, self.queue.keys.clone(), self.temperature)
        self.queue.push(keys)
        return self.weight * loss

"""Visual prompt tuning: learnable tokens in a frozen vision transformer.

VPT-deep (Jia et al., 2022): every transformer layer gets its own fresh prompt tokens, which replace
the previous layer's outputs at those positions. VPT-shallow inserts tokens once before the first
layer. Only the tokens train. Prompt tokens carry no position embedding, so where they sit in the
sequence does not matter to attention; we append them and drop them before pooling, which works
for both class-token and average pooling.

open_clip models whose vision tower is not its own VisionTransformer (timm or ResNet towers) get a
residual adapter on the image embedding instead, as the method spec allows.
"""

from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer
from torch import nn


class PromptedVisionTransformer(nn.Module):
    def __init__(self, visual: VisionTransformer, num_tokens: int, deep: bool, init_std: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        layers = len(visual.transformer.resblocks)
        width = visual.transformer.width
        device = visual.positional_embedding.device
        prompts = torch.randn((layers if deep else 1, num_tokens, width), generator=generator) * init_std
        self.prompts = nn.Parameter(prompts.to(device))
        self.deep = deep
        self._visual = [visual]  # frozen and shared between models: not a registered submodule

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self._visual[0]
        x = visual._embeds(images)  # patches + class token + positions, ln_pre
        batch, length = x.shape[0], x.shape[1]
        if not visual.transformer.batch_first:
            raise NotImplementedError("VPT needs a batch-first open_clip transformer")
        for index, block in enumerate(visual.transformer.resblocks):
            if index == 0 or self.deep:
                prompts = self.prompts[index if self.deep else 0].to(x.dtype).expand(batch, -1, -1)
                x = torch.cat([x[:, :length], prompts], dim=1)
            x = block(x)
        pooled, _ = visual._pool(x[:, :length])
        return pooled @ visual.proj if visual.proj is not None else pooled


class ResidualAdapter(nn.Module):
    """Stand-in for VPT on non-ViT towers: image embedding + a small zero-initialised residual MLP."""

    def __init__(self, visual: nn.Module, embed_dim: int, hidden: int = 256):
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.adapter[-1].weight)
        nn.init.zeros_(self.adapter[-1].bias)
        self._visual = [visual]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self._visual[0](images)
        return features + self.adapter(features.to(self.adapter[0].weight.dtype))


def prompted_visual(visual: nn.Module, embed_dim: int, num_tokens: int, deep: bool, init_std: float,
                    generator: torch.Generator | None = None) -> nn.Module:
    if isinstance(visual, VisionTransformer) and num_tokens > 0:
        return PromptedVisionTransformer(visual, num_tokens, deep, init_std, generator)
    return ResidualAdapter(visual, embed_dim).to(next(visual.parameters()).device)

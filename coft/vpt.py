"""Visual prompt tuning: learnable tokens in a frozen vision transformer.

VPT-deep (Jia et al., 2022): every transformer layer gets its own fresh prompt tokens, which replace
the previous layer's outputs at those positions. VPT-shallow inserts tokens once before the first
layer. Only the tokens train. They join the sequence inside the tower's own forward pass
(coft.openclip.appended_tokens), after the patch tokens, and leave before pooling.

open_clip models whose vision tower is not its own VisionTransformer (timm or ResNet towers) get a
residual adapter on the image embedding instead, as the method spec allows.
"""

from __future__ import annotations

import torch
from torch import nn

from coft.openclip import appended_tokens, image_embedding, is_prompted_vit, vision_layers


class PromptedVisionTransformer(nn.Module):
    def __init__(self, visual: nn.Module, num_tokens: int, deep: bool, init_std: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        layers, width = vision_layers(visual)
        device = next(visual.parameters()).device
        prompts = torch.randn((layers if deep else 1, num_tokens, width), generator=generator) * init_std
        self.prompts = nn.Parameter(prompts.to(device))
        self.deep = deep
        self._visual = [visual]  # frozen and shared between models: not a registered submodule

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self._visual[0]
        with appended_tokens(visual, self.prompts, self.deep):
            return image_embedding(visual(images))


class ResidualAdapter(nn.Module):
    """Stand-in for VPT on non-ViT towers: image embedding + a small zero-initialised residual MLP."""

    def __init__(self, visual: nn.Module, embed_dim: int, hidden: int = 256):
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.adapter[-1].weight)
        nn.init.zeros_(self.adapter[-1].bias)
        self._visual = [visual]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = image_embedding(self._visual[0](images))
        return features + self.adapter(features.to(self.adapter[0].weight.dtype))


def prompted_visual(visual: nn.Module, embed_dim: int, num_tokens: int, deep: bool, init_std: float,
                    generator: torch.Generator | None = None) -> nn.Module:
    if is_prompted_vit(visual) and num_tokens > 0:
        return PromptedVisionTransformer(visual, num_tokens, deep, init_std, generator)
    return ResidualAdapter(visual, embed_dim).to(next(visual.parameters()).device)

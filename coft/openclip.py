"""What coft needs from open_clip beyond its public API, in this one module.

open_clip_torch is pinned to one minor version (pyproject.toml); tests/test_families.py builds a
tiny model of every family open_clip ships and fails if anything here stops holding. Everything
else in coft calls open_clip's public functions and the models' own forward passes, so prompts
and visual tokens go through each family's real code path (its masks, class tokens, pooling and
projections), not a copy of it:

- the learnable text prompts replace token embeddings during the model's own `encode_text`
  (a forward hook on the text tower's token embedding: CLIP's, a TextTransformer's, or a Hugging
  Face encoder's input embeddings);
- visual prompt tokens join the sequence inside the ViT's own forward (hooks on its transformer and
  its blocks);
- a vision tower is rebuilt from a model config without its text tower (`_build_vision_tower`);
- a ViT tower trains on a random part of its patch tokens (its own `patch_dropout` module, swapped);
- a vision tower's parameters are numbered by depth, for layer-wise learning rates (`vision_depths`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn


def build_vision_tower(model_cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised vision tower of the given architecture (weights are loaded after)."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                               quick_gelu=model_cfg.get("quick_gelu", False))


@contextlib.contextmanager
def patch_dropout(visual: nn.Module, prob: float) -> Iterator[None]:
    """Inside, a ViT tower's training passes keep a random (1 - prob) of its patch tokens (open_clip's
    PatchDropout); eval passes keep them all. prob 0 changes nothing."""
    if not prob:
        yield
        return
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"patch dropout needs an open_clip ViT vision tower, not {type(visual).__name__}")
    own = visual.patch_dropout
    visual.patch_dropout = PatchDropout(prob)
    try:
        yield
    finally:
        visual.patch_dropout = own


def image_embedding(output: torch.Tensor | tuple) -> torch.Tensor:
    """A vision tower's pooled embedding: CoCa's towers return (pooled, tokens)."""
    return output[0] if isinstance(output, tuple) else output


# --------------------------------------------------------------------------- text


def text_tower(clip: nn.Module) -> nn.Module:
    """CLIP keeps its text tower on itself; CustomTextCLIP and CoCa under `.text`."""
    return clip.text if hasattr(clip, "text") else clip


def token_embedding(clip: nn.Module) -> nn.Embedding:
    """The embedding that turns token ids into the text transformer's first input."""
    text = text_tower(clip)
    if hasattr(text, "token_embedding"):
        return text.token_embedding
    return text.transformer.get_input_embeddings()  # a Hugging Face text encoder (HFTextEncoder)


def context_length(clip: nn.Module, tokenizer) -> int:
    """How many tokens the text tower takes."""
    length = getattr(tokenizer, "context_length", None) or getattr(text_tower(clip), "context_length", None)
    return int(length or 77)


@contextlib.contextmanager
def injected_embeddings(clip: nn.Module, positions: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """While the block runs, the text tower's token embeddings at `positions` ([B, M] per row of the
    batch) are `values` ([B, M, width]): gradients reach `values`, the rest is the model's own."""
    rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1).expand_as(positions)

    def replace(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.index_put((rows, positions), values.to(output.dtype))

    handle = token_embedding(clip).register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------- vision


def is_prompted_vit(visual: nn.Module) -> bool:
    """Whether visual prompt tokens (VPT) can join this tower's sequence: open_clip's own ViT."""
    return isinstance(visual, VisionTransformer)


def vision_layers(visual: VisionTransformer) -> tuple[int, int]:
    """(blocks, width) of a ViT's transformer."""
    return len(visual.transformer.resblocks), visual.transformer.width


def vision_depths(visual: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth in a vision tower, and the deepest depth: 0 for the stem (a ViT's patch
    embedding and what precedes its first block), one more for each block or stage, and the deepest for
    the pooling and projection. open_clip's ViT and ResNet towers, and timm trunks (by timm's own layer
    groups, as its layer-decay optimisers use them)."""
    if isinstance(visual, VisionTransformer):
        stages = vision_layers(visual)[0]
        stem = {"class_embedding", "positional_embedding", "conv1", "ln_pre"}
        prefix = "transformer.resblocks."

        def depth(name: str) -> int:
            if name.startswith(prefix):
                return int(name[len(prefix):].split(".")[0]) + 1
            return 0 if name.split(".")[0] in stem else stages + 1
    elif isinstance(visual, ModifiedResNet):
        stages = 4  # layer1-4, after the stem's three convolutions

        def depth(name: str) -> int:
            first = name.split(".")[0]
            if first.startswith("layer"):
                return int(first[len("layer"):])
            return stages + 1 if first == "attnpool" else 0
    elif isinstance(visual, TimmModel):
        from timm.models import group_parameters

        groups = group_parameters(visual.trunk, visual.trunk.group_matcher(coarse=False))
        trunk = {f"trunk.{name}": layer for layer, names in groups.items() for name in names}
        stages = max(groups)

        def depth(name: str) -> int:
            return trunk.get(name, stages + 1)
    else:
        raise ValueError(f"layer-wise learning rates need an open_clip ViT or ResNet tower or a timm trunk, "
                         f"not {type(visual).__name__}")
    return {name: depth(name) for name, _ in visual.named_parameters()}, stages + 1


@contextlib.contextmanager
def appended_tokens(visual: VisionTransformer, tokens: torch.Tensor, deep: bool) -> Iterator[None]:
    """While the block runs, `tokens` ([layers or 1, P, width]) join the ViT's sequence after its
    patch tokens: the first layer's before the first block, and with `deep` each block's own in place
    of the previous ones; they leave before pooling. They carry no position embedding, so where they
    sit does not matter to attention, and class-token and average pooling both see the image alone."""
    transformer = visual.transformer
    count = tokens.shape[1]
    sequence = 1 if getattr(transformer, "batch_first", True) else 0  # blocks of older towers see [L, N, D]

    def layer_tokens(index: int, like: torch.Tensor) -> torch.Tensor:
        batch = like.shape[1 - sequence]
        prompt = tokens[index].to(like.dtype)
        return prompt.expand(batch, -1, -1) if sequence == 1 else prompt.unsqueeze(1).expand(-1, batch, -1)

    def append(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0]  # [N, L, D] on the way in, whatever the blocks' layout
        return (torch.cat([x, tokens[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1), *args[1:]), kwargs

    def replace(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = args[0]
            kept = x[:, :-count] if sequence == 1 else x[:-count]
            return (torch.cat([kept, layer_tokens(index, x)], dim=sequence), *args[1:]), kwargs
        return hook

    def strip(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output[:, :-count]

    handles = [transformer.register_forward_pre_hook(append, with_kwargs=True),
               transformer.register_forward_hook(strip)]
    if deep:
        handles += [block.register_forward_pre_hook(replace(index), with_kwargs=True)
                    for index, block in enumerate(transformer.resblocks) if index > 0]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()

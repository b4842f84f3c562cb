"""Loading a CLIP backbone: any open_clip model, or the shipped proxy model.

A backbone is an open_clip model identifier plus optional pretrained weights:
- an architecture name (`ViT-B-16`) with a pretrained tag (`openai`, `laion2b_s34b_b88k`) or a local
  checkpoint file;
- `local-dir:PATH` or `hf-hub:ORG/REPO`, open_clip's own schemas (weights come with the config);
- `proxy`, the small CLIP this repository pretrains and ships (`coft/proxy/weights`).
The model's own preprocessing (image size, mean, std) is always used.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

PROXY_MODEL = "proxy"
PROXY_DIR = Path(__file__).parent / "proxy" / "weights"


@dataclass
class Backbone:
    """A loaded, frozen CLIP model with what is needed to feed it."""

    model: nn.Module  # open_clip CLIP / CustomTextCLIP, eval mode, requires_grad False
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_id: str  # as the user named it
    pretrained: str | None
    model_cfg: dict[str, Any]  # open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    preprocess_cfg: dict[str, Any]  # size, mean, std, interpolation, resize_mode
    device: torch.device

    @property
    def logit_scale(self) -> float:
        """1/tau of the method: CLIP's own learned temperature, frozen."""
        return float(self.model.logit_scale.exp())

    def eval_transform(self) -> Callable:
        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)


def proxy_weights_installed() -> bool:
    """Whether the shipped proxy model's config and weights are in place (`make pretrain-proxy` makes them)."""
    return (PROXY_DIR / "open_clip_config.json").is_file() and any(PROXY_DIR.glob("open_clip_model.*"))


def resolve_model_id(model: str) -> str:
    """The identifier open_clip understands: `proxy` is our shipped local-dir model."""
    return f"local-dir:{PROXY_DIR}" if model == PROXY_MODEL else model


def load_backbone(model: str = PROXY_MODEL, pretrained: str | None = None,
                  device: str | torch.device | None = None) -> Backbone:
    device = torch.device(device) if device is not None else default_device()
    open_clip_id = resolve_model_id(model)
    if open_clip_id.startswith(("local-dir:", "hf-hub:")) and pretrained:
        raise ValueError(f"{model!r} carries its own weights; do not also give pretrained={pretrained!r}")
    clip, _, _ = open_clip.create_model_and_transforms(open_clip_id, pretrained=pretrained, device=device)
    clip.eval().requires_grad_(False)
    return Backbone(
        model=clip,
        tokenizer=open_clip.get_tokenizer(open_clip_id),
        model_id=model,
        pretrained=pretrained,
        model_cfg=_model_config(open_clip_id, clip),
        preprocess_cfg=_preprocess_config(clip),
        device=device,
    )


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 where supported); full precision on CPU, where it is fastest."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling is needed for float16 autocast only (GPUs without bfloat16)."""
    enabled = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)


def _model_config(open_clip_id: str, clip: nn.Module) -> dict[str, Any]:
    config = open_clip.get_model_config(open_clip_id)
    if config is None:
        raise ValueError(f"no open_clip model config found for {open_clip_id!r}")
    config = json.loads(json.dumps(config))  # a private, JSON-clean copy
    # open_clip may switch activations after reading the config (QuickGELU for OpenAI weights);
    # record what the model really uses so that a rebuilt vision tower computes the same thing.
    config["quick_gelu"] = any(isinstance(m, open_clip.transformer.QuickGELU) for m in clip.modules())
    return config


def _preprocess_config(clip: nn.Module) -> dict[str, Any]:
    cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(clip.visual, "image_size", 224))
    return {
        "size": list(size) if isinstance(size, (list, tuple)) else int(size),
        "mean": list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": list(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }

"""Shared fixtures: a tiny random-init CLIP in open_clip's local-dir format, and a few small images.

Random weights are enough for mechanics (what trains, what stays frozen, what round-trips); no test
asserts accuracy.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PREPROCESS_CFG = {
    "size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The test machine is shared: stay on one core (and it makes CPU float math reproducible)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(1234)
    model = open_clip.model.CLIP(**TINY_MODEL_CFG)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    return directory


@pytest.fixture(scope="session")
def tiny_model_id(tiny_clip_dir) -> str:
    return f"local-dir:{tiny_clip_dir}"


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_id):
    from coft.backbone import load_backbone

    return load_backbone(tiny_model_id, device="cpu")


def draw_image(index: int, size: int = 32) -> Image.Image:
    """A coloured square or circle on a coloured background, different for every index."""
    palette = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40), (200, 60, 200), (40, 200, 210),
               (250, 250, 250), (20, 20, 20)]
    background = palette[(index * 3 + 1) % len(palette)]
    foreground = palette[index % len(palette)]
    if foreground == background:
        foreground = palette[(index + 1) % len(palette)]
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    offset = 2 + index % 7
    box = (offset, offset + index % 3, size - 4 - index % 5, size - 3)
    if index % 2:
        draw.ellipse(box, fill=foreground)
    else:
        draw.rectangle(box, fill=foreground)
    return image


@pytest.fixture(scope="session")
def tiny_images() -> list[Image.Image]:
    return [draw_image(i) for i in range(8)]


@pytest.fixture(scope="session")
def tiny_source(tiny_backbone, tiny_images):
    """tiny_images as the stages read them: decoded once into a (temporary) cache."""
    from coft.image_cache import cached_images

    return cached_images(tiny_images, tiny_backbone.preprocess_cfg, tiny_backbone.device)

"""Building test inputs (images, archives, a tiny CLIP) at test time: nothing binary is committed."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
from PIL import Image

TINY_MODEL = "tiny"
# Enough training to touch every stage, small enough that a CoFT job takes seconds on a CPU.
TINY_CONFIG = {
    "pseudo_labels": {"top_k": 2},
    "phase1": {"epochs": 1, "context_tokens": 4, "vpt_tokens": 2, "batch_size": 4},
    "phase2": {"epochs": 1, "batch_size": 4},
    "eval_batch_size": 4,
}


def png(seed: int, size: int = 32, color: tuple[int, int, int] | None = None) -> bytes:
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (size, size), color)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def image_zip(n: int = 20, extra: dict[str, bytes] | None = None, folder: Callable[[int], str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(n):
            prefix = f"{folder(i)}/" if folder else ""
            archive.writestr(f"{prefix}img{i:03d}.png", png(i))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def image_tar_gz(n: int = 5) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for i in range(n):
            data = png(100 + i)
            info = tarfile.TarInfo(f"photos/p{i}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tiny_model(directory: Path) -> Path:
    """A random-init open_clip model in open_clip's local-dir format (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**config["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    return directory


def api_answers(url: str) -> bool:
    """Whether an API at `url` answers /livez right now."""
    try:
        return httpx.get(f"{url}/livez", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)

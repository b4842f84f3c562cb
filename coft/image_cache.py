"""Decode every image once, into a memory-mapped file of uint8 pixels that every later pass reads.

A job reads each image many times: every epoch of every stage and round. Decoding a photo costs
milliseconds of CPU; copying its cached pixels costs microseconds. So a run decodes each image
once, in parallel threads (Pillow releases the GIL while it decodes and resizes, and threads,
unlike DataLoader processes, may run inside Celery's daemonic workers), into two files:

    images-<key>.u8     test rows, N x 3 x h x w, then (for training) train rows, N x 3 x H x W
    images-<key>.json   what the rows hold; written last, so a cache without it is partial

A test row is the model's exact test-time input before normalisation: open_clip's own resize and
crop for the model, so predictions inside a job are the ones the served classifier makes. A train
row is the same view at `scale` (1.15) times the input size, so that random crops keep detail;
the augmentations of coft.augment read it on the device. The size is fixed by the geometry,
N x 3 x (h x w + H x W) bytes whatever the size of the original files, and checked against the
free disk before anything is written. A run that finds a complete cache of the same images and
geometry reuses it; a partial one is rebuilt.

`CachedImages` is what the stages read (the `ImageSource` protocol): rows gathered by index and
copied to the model's device through pinned memory, turned into model inputs there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import nn
from torchvision import transforms

from coft.augment import input_size, normalize
from coft.data import DataError, default_threads

CACHE_FORMAT = 1
_CHUNK = 64  # most images per unit of work handed to a decoding thread


@runtime_checkable
class ImageSource(Protocol):
    """Images as the model sees them: what every stage reads instead of PIL images."""

    fingerprint: str  # identifies the images, for checkpoints

    def __len__(self) -> int: ...

    def test_view(self, indices: torch.Tensor) -> torch.Tensor:
        """The model's test-time inputs [B, 3, h, w] of these images, on its device."""

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """The training rows of these images, on the model's device, for `view`."""

    def view(self, pixels: torch.Tensor, augmentation: nn.Module) -> torch.Tensor:
        """Augmented model inputs [B, 3, h, w] from training rows."""


def training_inputs(images: ImageSource, indices: torch.Tensor, augmentation: nn.Module | None,
                    pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Model inputs for a training step: `augmentation` of the train rows of `indices` (`pixels`, when
    the caller has read them already), or their test-time view when the config turns augmentation off."""
    if augmentation is None:
        return images.test_view(indices)
    return images.view(images.pixels(indices) if pixels is None else pixels, augmentation)


def train_size(preprocess_cfg: dict[str, Any], scale: float) -> tuple[int, int]:
    """(height, width) of a train row: the model's input size times `scale`, rounded up."""
    height, width = input_size(preprocess_cfg)
    return math.ceil(height * scale - 1e-9), math.ceil(width * scale - 1e-9)


def eval_geometry(preprocess_cfg: dict[str, Any], size: tuple[int, int]) -> Callable[[Image.Image], Image.Image]:
    """open_clip's test-time transform for this model at `size`, without its tensor conversion and
    normalisation: the resize and crop (or pad) rule lives in open_clip only."""
    steps = image_transform_v2(PreprocessCfg(**{**preprocess_cfg, "size": size}), is_train=False).transforms
    kept = [s for s in steps if not isinstance(s, (transforms.ToTensor, transforms.Normalize))
            and "ToTensor" not in type(s).__name__]
    return transforms.Compose(kept)


def _decoder(images: Sequence[Image.Image], at_least: tuple[int, int]) -> Callable[[int], Image.Image]:
    """coft.data.ImageSet (and sequences built on it) can decode JPEGs at a reduced scale."""
    decode = getattr(images, "decode", None)
    if decode is not None:
        return lambda index: decode(index, at_least)
    return lambda index: images[index]


@dataclass(frozen=True)
class CacheStats:
    images: int
    test_size: tuple[int, int]
    train_size: tuple[int, int] | None  # None: test rows only (nothing trains on these images)
    bytes: int
    reused: bool
    build_s: float
    threads: int  # threads that decoded (0 when reused)

    def as_metrics(self) -> dict[str, Any]:
        metrics = {"images": self.images, "test_size": list(self.test_size),
                   "train_size": list(self.train_size) if self.train_size else None,
                   "bytes": self.bytes, "reused": self.reused}
        if not self.reused:
            metrics.update(build_s=round(self.build_s, 3), threads=self.threads,
                           images_per_s=round(self.images / self.build_s, 1) if self.build_s > 0 else None)
        return metrics


class ImageCache:
    """The uint8 rows of one set of images at one model's geometry, memory-mapped read-only."""

    def __init__(self, data_path: Path, stats: CacheStats):
        n = stats.images
        self.path, self.stats = data_path, stats
        test_shape = (n, 3, *stats.test_size)
        self.test_rows = np.memmap(data_path, dtype=np.uint8, mode="r", shape=test_shape)
        self.train_rows = (np.memmap(data_path, dtype=np.uint8, mode="r", shape=(n, 3, *stats.train_size),
                                     offset=int(np.prod(test_shape))) if stats.train_size else None)

    def __len__(self) -> int:
        return self.stats.images

    def read(self, indices: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Rows [B, 3, H, W] uint8 on the CPU, in the order of `indices`."""
        rows = self.train_rows if train else self.test_rows
        if rows is None:
            raise ValueError("this cache holds test-time rows only")
        return torch.from_numpy(rows[indices.cpu().numpy()])

    @classmethod
    def build(cls, images: Sequence[Image.Image], directory: str | os.PathLike | None, preprocess_cfg: dict[str, Any],
              *, key: str, train_scale: float | None = 1.15, threads: int | None = None,
              report: Callable[[float, str], None] | None = None) -> ImageCache:
        """Open the complete cache of `images` (identified by `key`) for this model in `directory`, or
        decode them into a new one; `train_scale` None keeps test rows only. Without a directory the
        cache is temporary: its file is removed at once and lives on in the memory map."""
        if len(images) == 0:
            raise ValueError("no images to cache")
        if directory is None:
            with tempfile.TemporaryDirectory(prefix="coft-images-") as temporary:
                return cls.build(images, temporary, preprocess_cfg, key=key, train_scale=train_scale,
                                 threads=threads, report=report)
        test = input_size(preprocess_cfg)
        train = train_size(preprocess_cfg, train_scale) if train_scale else None
        nbytes = len(images) * 3 * (test[0] * test[1] + (train[0] * train[1] if train else 0))
        description = {"format": CACHE_FORMAT, "key": key, "images": len(images), "test_size": list(test),
                       "train_size": list(train) if train else None, "preprocess_cfg": preprocess_cfg}
        name = "images-" + hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data_path, marker = directory / f"{name}.u8", directory / f"{name}.json"
        if marker.exists() and data_path.exists() and data_path.stat().st_size == nbytes:
            if json.loads(marker.read_text()).get("description") == description:
                return cls(data_path, CacheStats(len(images), test, train, nbytes, True, 0.0, 0))
        marker.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
        free = shutil.disk_usage(directory).free
        if nbytes > free:
            raise DataError("cache-space", f"decoding {len(images)} images for the model needs "
                            f"{nbytes / 2**30:.2f} GiB; {free / 2**30:.2f} GiB free in {directory}")
        started = time.perf_counter()
        data = np.memmap(data_path, dtype=np.uint8, mode="w+", shape=(nbytes,))
        test_rows = data[:len(images) * 3 * test[0] * test[1]].reshape(len(images), 3, *test)
        train_rows = data[test_rows.size:].reshape(len(images), 3, *train) if train else None
        used_threads = _fill(test_rows, train_rows, images, preprocess_cfg, threads or default_threads(), report)
        data.flush()
        del data, test_rows, train_rows
        stats = CacheStats(len(images), test, train, nbytes, False, time.perf_counter() - started, used_threads)
        temporary = marker.with_suffix(".json.tmp")
        temporary.write_text(json.dumps({"description": description, "stats": stats.as_metrics()}))
        os.replace(temporary, marker)
        return cls(data_path, stats)


def _fill(test_rows: np.ndarray, train_rows: np.ndarray | None, images: Sequence[Image.Image],
          preprocess_cfg: dict[str, Any], threads: int, report: Callable[[float, str], None] | None) -> int:
    """Decode every image into its rows, in `threads` threads; returns how many threads did work.

    Thread t takes every t-th chunk, so each of them works on any set of at least `threads`
    chunks; the calling thread only reports progress (the callback may raise to stop the run).
    """
    test_geometry = eval_geometry(preprocess_cfg, tuple(test_rows.shape[2:]))
    train_geometry = eval_geometry(preprocess_cfg, tuple(train_rows.shape[2:])) if train_rows is not None else None
    largest = train_rows.shape[2:] if train_rows is not None else test_rows.shape[2:]
    decode = _decoder(images, (largest[1], largest[0]))
    count = len(images)
    threads = max(1, min(threads, count))
    chunk = max(1, min(_CHUNK, count // (4 * threads)))
    starts = range(0, count, chunk)
    done, workers, lock, stop = [0], set(), threading.Lock(), threading.Event()

    def store(rows: np.ndarray, index: int, view: Image.Image) -> None:
        rows[index] = np.asarray(view.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)

    def fill(part: int) -> None:
        for start in starts[part::threads]:
            if stop.is_set():
                return
            for index in range(start, min(start + chunk, count)):
                image = decode(index)
                store(test_rows, index, test_geometry(image))
                if train_geometry is not None:
                    store(train_rows, index, train_geometry(image))
            with lock:
                done[0] += min(chunk, count - start)
                workers.add(part)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="coft-decode") as pool:
        futures = [pool.submit(fill, part) for part in range(threads)]
        try:
            while True:
                finished, running = wait(futures, timeout=0.25, return_when=FIRST_EXCEPTION)
                for future in finished:
                    future.result()  # a decoding error ends the build here
                if report is not None:
                    report(done[0] / count, f"decoded {done[0]}/{count} images")
                if not running:
                    break
        except BaseException:  # stop the other threads too before the error leaves
            stop.set()
            raise
    return len(workers)


class CachedImages:
    """An ImageSource over an ImageCache, turning rows into model inputs on the device.

    Where the whole cache fits in a quarter of the GPU's free memory (5,000 images at 224 pixels are
    1.7 GB; an H200 has 140), it is copied there once and a batch is a gather on the GPU. Otherwise
    rows are gathered on the CPU and copied through pinned memory without waiting.
    """

    def __init__(self, cache: ImageCache, preprocess_cfg: dict[str, Any], device: torch.device, fingerprint: str,
                 on_device: bool | None = None):
        self.cache = cache
        self.device = torch.device(device)
        self.normalize = normalize(preprocess_cfg)
        self.fingerprint = fingerprint
        if on_device is None:
            on_device = (self.device.type == "cuda"
                         and cache.stats.bytes <= 0.25 * torch.cuda.mem_get_info(self.device)[0])
        self.resident = (self._resident(cache.test_rows), self._resident(cache.train_rows)) if on_device else None

    def _resident(self, rows: np.ndarray | None) -> torch.Tensor | None:
        if rows is None:
            return None
        resident = torch.empty(rows.shape, dtype=torch.uint8, device=self.device)
        for start in range(0, len(rows), 1024):  # in slices: the memory map need not fit in host memory
            resident[start:start + 1024].copy_(torch.from_numpy(np.array(rows[start:start + 1024])))
        return resident

    def __len__(self) -> int:
        return len(self.cache)

    def _rows(self, indices: torch.Tensor, train: bool) -> torch.Tensor:
        if self.resident is not None:
            rows = self.resident[1 if train else 0]
            if rows is None:
                raise ValueError("this cache holds test-time rows only")
            return rows[indices.to(self.device, non_blocking=True)]
        rows = self.cache.read(indices, train)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    @torch.no_grad()
    def test_view(self, indices: torch.Tensor) -> torch.Tensor:
        return self.normalize(self._rows(indices, train=False).float().div_(255.0))

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        return self._rows(indices, train=True)

    @torch.no_grad()
    def view(self, pixels: torch.Tensor, augmentation: nn.Module) -> torch.Tensor:
        return augmentation(pixels.float().div_(255.0))


class Subset:
    """images[indices] as an ImageSource of its own (a baseline that trains on S* alone, say)."""

    def __init__(self, images: ImageSource, indices: torch.Tensor):
        self.images, self.indices = images, indices.cpu()
        digest = hashlib.sha256(self.indices.numpy().tobytes()).hexdigest()[:16]
        self.fingerprint = f"{images.fingerprint}[{digest}]"

    def __len__(self) -> int:
        return len(self.indices)

    def test_view(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images.test_view(self.indices[indices.cpu()])

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images.pixels(self.indices[indices.cpu()])

    def view(self, pixels: torch.Tensor, augmentation: nn.Module) -> torch.Tensor:
        return self.images.view(pixels, augmentation)


def image_fingerprint(images: Sequence[Image.Image]) -> str:
    """Identifies a set of images cheaply: its length, its names when it has them, and the pixels of
    its first and last images."""
    digest = hashlib.sha256(str(len(images)).encode())
    names = getattr(images, "names", None)
    if names is not None:
        digest.update("\0".join(names).encode())
    for index in sorted({0, len(images) - 1}) if len(images) else ():
        digest.update(images[index].tobytes())
    return digest.hexdigest()


def cached_images(images: Sequence[Image.Image], preprocess_cfg: dict[str, Any], device: torch.device | str, *,
                  directory: str | os.PathLike | None = None, train_scale: float | None = 1.15,
                  threads: int | None = None, report: Callable[[float, str], None] | None = None,
                  fingerprint: str | None = None) -> CachedImages:
    """Decode `images` once (or reuse their cache in `directory`) and serve them on `device`.
    `train_scale` None: test-time rows only. `fingerprint`: image_fingerprint(images), if known."""
    fingerprint = fingerprint or image_fingerprint(images)
    cache = ImageCache.build(images, directory, preprocess_cfg, key=fingerprint, train_scale=train_scale,
                             threads=threads, report=report)
    return CachedImages(cache, preprocess_cfg, torch.device(device), fingerprint)

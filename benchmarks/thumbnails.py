"""How long a dashboard thumbnail takes to read, side by side: opening the dataset's archive for each
one (the code before `ArchiveIndex`) against one index per dataset that reads only its member.

    python benchmarks/thumbnails.py --images 2000 --thumbnails 24
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from coft import ArchiveIndex, open_images


def photo_zip(path: Path, count: int) -> None:
    """`count` photo-sized JPEGs (500x375, noise: large files, the worst case for reading them all)."""
    base = (np.random.default_rng(0).random((375, 500, 3)) * 255).astype("uint8")
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            out = io.BytesIO()
            Image.fromarray(np.roll(base, i, axis=1)).save(out, "JPEG", quality=90)
            archive.writestr(f"photos/{i:05d}.jpg", out.getvalue())


def small(image: Image.Image, size: int) -> bytes:
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--thumbnails", type=int, default=24, help="one gallery page")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "dataset.zip"
        photo_zip(path, args.images)
        picks = np.random.default_rng(1).choice(args.images, args.thumbnails, replace=False).tolist()
        started = time.perf_counter()
        before = [small(open_images(path, verify=False).decode(i, at_least=(args.size,) * 2), args.size) for i in picks]
        reopening = time.perf_counter() - started
        started = time.perf_counter()
        index = ArchiveIndex([path])
        opened = time.perf_counter() - started
        started = time.perf_counter()
        after = [small(index.decode(i, at_least=(args.size,) * 2), args.size) for i in picks]
        reading = time.perf_counter() - started
        assert before == after, "the two paths must serve the same thumbnails"
        print(f"{args.images} JPEGs, {path.stat().st_size / 2**20:.0f} MiB zip, {args.thumbnails} thumbnails of "
              f"{args.size} px")
        print(f"reopening the archive each time: {reopening / args.thumbnails * 1000:.1f} ms per thumbnail")
        print(f"one ArchiveIndex: built once in {opened * 1000:.0f} ms, then "
              f"{reading / args.thumbnails * 1000:.1f} ms per thumbnail "
              f"({reopening / reading:.0f}x faster; a page including the build: {reopening / (opened + reading):.1f}x)")


if __name__ == "__main__":
    main()

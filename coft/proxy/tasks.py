"""Target tasks for the proxy CLIP: classification under distribution shifts the corpus never showed.

Each task is deterministic: an unlabeled train split (what a user would upload) and a labelled
test split (used only to measure). Its labels for the train split exist too, for benchmarks that
measure the precision of pseudo-labels; the method never sees them.

    python -m coft.proxy.tasks export digits-handwritten out/   # PNG folders + classes.txt
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from coft.proxy.render import COLOURS, DIGIT_WORDS, SHAPES, Scene, render


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    kind: str  # "digit" or "shape"
    fonts: tuple[str, ...] = ("typeset",)
    backgrounds: tuple[str, ...] = ("plain",)
    degradations: tuple[str, ...] = ()  # all applied, in order
    filled: float = 1.0  # probability that a shape is filled
    colours: tuple[str, ...] = tuple(COLOURS)
    flip_invariant: bool = False  # digits and arrows are not: mirroring changes them
    num_train: int = 1000
    num_test: int = 500

    @property
    def class_names(self) -> list[str]:
        return list(DIGIT_WORDS) if self.kind == "digit" else list(SHAPES)


# Severities were set once, after pretraining, so that zero-shot lands between 25% and 75% on each
# (measured in tests/test_proxy.py); nothing here is tuned on CoFT's results.
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("digits-handwritten", "digits in an unseen handwritten font on wood and cloud textures",
             kind="digit", fonts=("handwritten",), backgrounds=("wood", "clouds")),
    TaskSpec("digits-occluded", "known fonts on unseen cloud textures, with two occluding patches",
             kind="digit", fonts=("typeset", "stroke", "segment"), backgrounds=("clouds",), degradations=("occluded",)),
    TaskSpec("digits-unseen-fonts", "digits in two unseen fonts (dot-matrix and handwritten)",
             kind="digit", fonts=("dotmatrix", "handwritten"), backgrounds=("plain", "clouds")),
    TaskSpec("shapes-noisy", "shapes under heavy noise on unseen cloud textures",
             kind="shape", backgrounds=("clouds",), degradations=("heavy-noise",)),
    TaskSpec("shapes-outlined-cast", "shapes, mostly outlined, under a strong colour cast and low contrast, "
             "on wood and scribbles", kind="shape", backgrounds=("wood", "scribbles"),
             degradations=("colour-cast", "low-contrast"), filled=0.3),
]}


# Development tasks: other combinations of the held-out fonts, backgrounds and degradations. Method
# hyperparameters that the spec leaves open are chosen on these (benchmarks/tune_dev.py), never on
# TASKS, so the benchmark's numbers are not tuned on the tasks they report.
DEV_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("dev-digits-segment-cast", "segment and typeset digits under a colour cast on wood and scribbles",
             kind="digit", fonts=("segment", "typeset"), backgrounds=("wood", "scribbles"),
             degradations=("colour-cast",)),
    TaskSpec("dev-shapes-occluded-wood", "shapes on wood with two occluding patches",
             kind="shape", backgrounds=("wood",), degradations=("occluded",)),
    TaskSpec("dev-shapes-scribbles-jpeg", "shapes, some outlined, on scribbles, JPEG-compressed",
             kind="shape", backgrounds=("scribbles",), degradations=("jpeg",), filled=0.6),
]}


@dataclass
class ProxyTask:
    spec: TaskSpec
    train_images: list[Image.Image]
    train_labels: list[int]  # never given to the method; benchmarks use them to measure label precision
    test_images: list[Image.Image]
    test_labels: list[int]
    class_names: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


def load_task(name: str, num_train: int | None = None, num_test: int | None = None) -> ProxyTask:
    """Render a task; the same name and sizes always give the same images."""
    spec = TASKS.get(name) or DEV_TASKS.get(name)
    if spec is None:
        raise KeyError(f"unknown proxy task {name!r}; known: {', '.join([*TASKS, *DEV_TASKS])}")
    num_train = spec.num_train if num_train is None else num_train
    num_test = spec.num_test if num_test is None else num_test
    base_seed = zlib.crc32(name.encode())
    train_images, train_labels = _render_split(spec, num_train, base_seed)
    test_images, test_labels = _render_split(spec, num_test, base_seed + 1)
    return ProxyTask(spec, train_images, train_labels, test_images, test_labels, spec.class_names)


def _render_split(spec: TaskSpec, count: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    rng = np.random.default_rng(seed)
    num_classes = len(spec.class_names)
    labels = [i % num_classes for i in range(count)]  # balanced, then shuffled
    rng.shuffle(labels)
    images = []
    for label in labels:
        colour, background_colour = rng.choice(list(spec.colours), size=2, replace=False)
        scene = Scene(
            kind=spec.kind,
            label=int(label),
            colour=str(colour),
            background=str(rng.choice(spec.backgrounds)),
            background_colour=str(background_colour),
            size=str(rng.choice(["medium", "large"])),
            font=str(rng.choice(spec.fonts)),
            filled=bool(rng.random() < spec.filled),
            degradations=list(spec.degradations),
            seed=int(rng.integers(2**31)),
        )
        images.append(render(scene))
    return images, [int(label) for label in labels]


def export_task(task: ProxyTask, out: str | Path) -> Path:
    """Write `unlabeled/` (flat PNGs), `test/<class>/` (labelled PNGs) and `classes.txt`."""
    out = Path(out)
    (out / "unlabeled").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(task.train_images):
        image.save(out / "unlabeled" / f"{i:05d}.png")
    for i, (image, label) in enumerate(zip(task.test_images, task.test_labels)):
        folder = out / "test" / task.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png")
    (out / "classes.txt").write_text("\n".join(task.class_names) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Proxy target tasks")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    export = sub.add_parser("export")
    export.add_argument("name", choices=sorted(TASKS))
    export.add_argument("out", type=Path)
    export.add_argument("--num-train", type=int)
    export.add_argument("--num-test", type=int)
    args = parser.parse_args(argv)
    if args.command == "list":
        for spec in TASKS.values():
            print(f"{spec.name:24s} {len(spec.class_names):3d} classes  {spec.description}")
    else:
        print(export_task(load_task(args.name, args.num_train, args.num_test), args.out))


if __name__ == "__main__":
    main()

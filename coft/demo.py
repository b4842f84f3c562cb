"""`make demo-cli`: adapt the shipped proxy CLIP to a proxy task with the `coft` CLI, as a user would.

Writes the task's unlabeled images and labelled test images as PNG folders, runs `coft adapt`
(zero-shot, then CoFT), then `coft predict` on the test images, and prints both accuracies.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from coft.proxy.tasks import TASKS, export_task, load_task


def run(command: list[str]) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)


def accuracy_of(predictions_csv: Path) -> float:
    with predictions_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    # The test images sit in folders named after their class: the path's first part is the truth.
    return sum(row["path"].split("/")[0] == row["label"] for row in rows) / len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="digits-handwritten", choices=sorted(TASKS))
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="coft-demo-") as temporary:
        workdir = args.workdir or Path(temporary)
        task = load_task(args.task, args.num_train, args.num_test)
        export_task(task, workdir / "task")
        print(f"proxy task {task.name}: {task.spec.description}; {len(task.train_images)} unlabeled images, "
              f"{len(task.test_images)} labelled test images, classes: {', '.join(task.class_names)}")
        config = workdir / "config.json"
        # Digits change class when mirrored: no horizontal flips in the augmentations.
        flips = {} if task.spec.flip_invariant else {"phase1": {"hflip": False}, "phase2": {"hflip": False}}
        config.write_text(json.dumps(flips))
        coft = [sys.executable, "-m", "coft.cli"]
        accuracies = {}
        for method in ("zero-shot", "coft"):
            classifier = workdir / f"classifier-{method}"
            run(coft + ["adapt", "--images", str(workdir / "task" / "unlabeled"),
                        "--classes-file", str(workdir / "task" / "classes.txt"), "--method", method,
                        "--config", str(config), "--out", str(classifier)])
            predictions = workdir / f"predictions-{method}.csv"
            run(coft + ["predict", "--classifier", str(classifier), "--images", str(workdir / "task" / "test"),
                        "--out", str(predictions)])
            accuracies[method] = accuracy_of(predictions)
        print(f"\ntest accuracy on {task.name}: zero-shot {100 * accuracies['zero-shot']:.1f}%  ->  "
              f"CoFT {100 * accuracies['coft']:.1f}%  ({100 * (accuracies['coft'] - accuracies['zero-shot']):+.1f} "
              f"points, no labels used)")


if __name__ == "__main__":
    main()

"""Accuracy benchmark: zero-shot vs CoFT on every proxy task, over several seeds.

    python benchmarks/accuracy.py             # every task, 3 seeds (the table in RESULTS.md)
    python benchmarks/accuracy.py --quick     # smaller splits, 1 seed: a smoke run in minutes

For each task and method it prints test accuracy (mean ± std over seeds) of zero-shot, each Phase I
and Phase II model and the final ensemble, the precision of the pseudo-labels the method trusted
(zero-shot labels of all of U, S*, each S_clean; the train labels are used only to measure this),
and wall time. Everything is measured in this one run, side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coft.backbone import load_backbone  # noqa: E402
from coft.config import CoFTConfig  # noqa: E402
from coft.pipeline import LabelledImages, adapt  # noqa: E402
from coft.proxy.tasks import TASKS, load_task  # noqa: E402

ACCURACY_COLUMNS = ["zero_shot", "phase1_model1", "phase1_model2", "phase2_model1", "phase2_model2", "final"]
PRECISION_COLUMNS = ["zero_shot", "s_star", "clean_model1", "clean_model2"]


def run_one(task, backbone, method: str, seed: int, overrides: dict) -> dict:
    config = CoFTConfig.from_dict({**overrides, "seed": seed})
    truth = torch.tensor(task.train_labels)
    started = time.perf_counter()
    result = adapt(task.train_images, task.class_names, method=method, backbone=backbone, config=config,
                   evaluation=LabelledImages(task.test_images, torch.tensor(task.test_labels)))
    elapsed = time.perf_counter() - started
    precision = {name: float((labels == truth[indices]).float().mean()) if len(indices) else float("nan")
                 for name, (indices, labels) in result.selections.items()}
    sizes = {name: len(indices) for name, (indices, _) in result.selections.items()}
    return {"task": task.name, "method": method, "seed": seed, "seconds": elapsed,
            "accuracy": result.metrics["accuracy"], "precision": precision, "selected": sizes}


def summarise(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def print_tables(runs: list[dict], num_seeds: int) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    print(f"\n### Test accuracy (%), mean ± std over {num_seeds} seed(s)\n")
    print("| task | " + " | ".join(ACCURACY_COLUMNS) + " | CoFT - zero-shot | seconds/run |")
    print("|---" * (len(ACCURACY_COLUMNS) + 3) + "|")
    gains = []
    for task in tasks:
        rows = [r for r in runs if r["task"] == task and r["method"] == "coft"]
        cells = [summarise([r["accuracy"].get(c, float("nan")) for r in rows]) for c in ACCURACY_COLUMNS]
        gain = [r["accuracy"]["final"] - r["accuracy"]["zero_shot"] for r in rows]
        gains += gain
        seconds = statistics.fmean(r["seconds"] for r in rows)
        print(f"| {task} | " + " | ".join(cells) + f" | {summarise(gain)} | {seconds:.0f} |")
    all_rows = [r for r in runs if r["method"] == "coft"]
    cells = [summarise([r["accuracy"].get(c, float("nan")) for r in all_rows]) for c in ACCURACY_COLUMNS]
    print("| **average** | " + " | ".join(cells) + f" | {summarise(gains)} | |")

    print("\n### Pseudo-label precision on the unlabeled train split (%), and how many images each set holds\n")
    print("| task | " + " | ".join(f"{c} (n)" for c in PRECISION_COLUMNS) + " |")
    print("|---" * (len(PRECISION_COLUMNS) + 1) + "|")
    for task in tasks:
        rows = [r for r in runs if r["task"] == task and r["method"] == "coft"]
        cells = []
        for c in PRECISION_COLUMNS:
            size = statistics.fmean(r["selected"].get(c, 0) for r in rows)
            cells.append(f"{summarise([r['precision'].get(c, float('nan')) for r in rows])} ({size:.0f})")
        print(f"| {task} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=None, help="unlabeled images per task (default: task's)")
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="1 seed, 400 train / 200 test images per task")
    parser.add_argument("--model", default="proxy")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--config", type=Path, help="JSON overrides of the method config")
    parser.add_argument("--json", type=Path, help="also write every run as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.num_train, args.num_test = 1, args.num_train or 400, args.num_test or 200
    overrides = json.loads(args.config.read_text()) if args.config else {}

    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone(args.model, args.pretrained)
    runs = []
    started = time.perf_counter()
    for name in args.tasks:
        task = load_task(name, args.num_train, args.num_test)
        task_overrides = json.loads(json.dumps(overrides))
        if not task.spec.flip_invariant:
            # Mirroring changes digits and arrows: the task's nature, not a tuned hyperparameter.
            for phase in ("phase1", "phase2"):
                task_overrides.setdefault(phase, {}).setdefault("hflip", False)
        for seed in range(args.seeds):
            run = run_one(task, backbone, "coft", seed, task_overrides)
            runs.append(run)
            acc = run["accuracy"]
            print(f"{name} seed {seed}: zero-shot {100 * acc['zero_shot']:.1f}  CoFT {100 * acc['final']:.1f}  "
                  f"({run['seconds']:.0f}s)", flush=True)
    print_tables(runs, args.seeds)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f}s, backbone {args.model}, "
          f"torch threads {torch.get_num_threads()}, device {backbone.device}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()

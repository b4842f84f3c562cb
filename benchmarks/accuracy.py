"""Accuracy benchmark: every method on every proxy task, over several seeds, one table (paper Tables 1, 4).

    python benchmarks/accuracy.py                       # every method, every task, 3 seeds (RESULTS.md)
    python benchmarks/accuracy.py --quick               # 2 tasks, small splits, short schedules, 1 seed
    python benchmarks/accuracy.py --methods coft coft+ --tasks shapes-noisy
    python benchmarks/accuracy.py --data ~/eurosat --model ViT-B-16 --pretrained openai   # a real dataset, real CLIP

`--data DIR` scores a dataset on disk beside (or instead of) the proxy tasks: `DIR/test/<class>/` (labelled,
only ever scored), and either `DIR/train/<class>/` (labelled: the labels are used only to measure the
pseudo-labels' precision and to draw the few-shot rows' shots) or `DIR/unlabeled/` (flat; no few-shot rows).
Class names come from `DIR/classes.txt` (one per line) if present, else from the test folders' names
('_' read as a space). This is the layout `python -m coft.proxy.tasks export` writes and `coft adapt`
reads. The folders are used whole (`--num-train`/`--num-test` size the proxy tasks only).

Methods (`--methods`, names or groups): label-free `zero-shot`, `zero-shot-ensemble`, `upl`, `fixmatch`,
`fixmatch-da` (with ReMixMatch's distribution alignment), `topk-ft-16` and `topk-ft-32` (a plain full
fine-tune on the top-K zero-shot pseudo-labels per class), `coft`, `coft+`; with k labelled shots per
class from the train split (`--shots`, default 1 2 4 8 16) `coop-k` and `linear-probe-k`.
Groups: `label-free`, `few-shot`, `coop`, `linear-probe`, `all` (default).

The main table gives test accuracy, mean ± std over seeds, per method and task, and wall time per
run. Every method runs once per seed (the seed also draws the few-shot examples), except zero-shot,
which has no randomness and runs once.
For CoFT and CoFT+ it also prints each stage's accuracy and the precision of the pseudo-labels they
trusted (the train labels are used only to measure this). The test split is only ever scored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coft import baselines  # noqa: E402
from coft.backbone import Backbone, load_backbone  # noqa: E402
from coft.config import CoFTConfig  # noqa: E402
from coft.data import open_images, open_labelled_images  # noqa: E402
from coft.pipeline import LabelledImages, adapt  # noqa: E402
from coft.proxy.tasks import DEV_TASKS, TASKS, load_task  # noqa: E402

STAGE_COLUMNS = ["zero_shot", "phase1_model1", "phase1_model2", "phase2_model1", "phase2_model2", "final"]
PRECISION_COLUMNS = ["zero_shot", "s_star", "clean_model1", "clean_model2"]
LABEL_FREE = ["zero-shot", "zero-shot-ensemble", "upl", "fixmatch", "fixmatch-da", "topk-ft-16", "topk-ft-32",
              "coft", "coft+"]
DETERMINISTIC = {"zero-shot", "zero-shot-ensemble"}
QUICK_TASKS = ["digits-handwritten", "shapes-noisy"]
FEW_SHOT_PREFIXES = ("coop-", "linear-probe-")  # the methods that train on labelled shots
# --quick shortens every schedule by the same factor, so that it still compares like with like.
QUICK_OVERRIDES = {"phase1": {"epochs": 5}, "phase2": {"epochs": 3}, "coft_plus": {"rounds": 2}}
QUICK_EPOCH_FACTOR = 0.15


@dataclass
class Task:
    """What the methods are scored on: a proxy task, rendered, or a dataset on disk (`--data`)."""

    name: str
    class_names: list[str]
    train_images: Sequence[Image.Image]
    train_labels: list[int] | None  # never given to a label-free method; None: the train split is unlabeled
    test_images: Sequence[Image.Image]
    test_labels: list[int]
    flip_invariant: bool  # mirroring keeps the class (photos of objects), or changes it (digits, text)


def proxy_task(name: str, num_train: int | None, num_test: int | None) -> Task:
    task = load_task(name, num_train, num_test)
    return Task(name, task.class_names, task.train_images, task.train_labels, task.test_images, task.test_labels,
                task.spec.flip_invariant)


def folder_task(root: Path, flip_invariant: bool = True) -> Task:
    """`root/test/<class>/`, and `root/train/<class>/` or `root/unlabeled/`; class names from
    `root/classes.txt` or the test folders (the module docstring has the layout)."""
    if not (root / "test").is_dir():
        raise SystemExit(f"{root}: no test/<class>/ folders")
    names_file = root / "classes.txt"
    if names_file.exists():
        class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        test = open_labelled_images(root / "test", class_names=class_names)
    else:  # the folders' names, as a prompt reads them: "annual_crop" is "annual crop"
        test = open_labelled_images(root / "test")
        class_names = [" ".join(name.replace("_", " ").split()) for name in test.class_names]
    if (root / "train").is_dir():
        train = open_labelled_images(root / "train", class_names=class_names)
        train_images, train_labels = train.images, train.labels
    elif (root / "unlabeled").is_dir():
        train_images, train_labels = open_images(root / "unlabeled"), None
    else:
        raise SystemExit(f"{root}: neither train/<class>/ nor unlabeled/ found")
    return Task(root.resolve().name, class_names, train_images, train_labels, test.images, test.labels, flip_invariant)


@dataclass
class Setting:
    """What one run needs: the task, the backbone, the seed, and the method configs for this task."""

    task: Task
    backbone: Backbone
    seed: int
    overrides: dict  # CoFT/CoFT+ config overrides (JSON)
    fixmatch: dict = field(default_factory=dict)  # FixMatchConfig overrides (JSON)
    epoch_factor: float = 1.0  # < 1 in --quick mode, for the baselines' schedules

    @property
    def hflip(self) -> bool:
        # Mirroring changes digits and arrows: the task's nature, not a tuned hyperparameter.
        return self.task.flip_invariant

    def epochs(self, epochs: int) -> int:
        return max(1, round(epochs * self.epoch_factor))

    def test_accuracy(self, classifier) -> float:
        predicted = classifier.predict(self.task.test_images).indices
        return float((predicted == torch.tensor(self.task.test_labels)).float().mean())


def run_coft(method: str) -> Callable[[Setting], dict]:
    def run(s: Setting) -> dict:
        overrides = json.loads(json.dumps(s.overrides))
        for phase in ("phase1", "phase2"):
            overrides.setdefault(phase, {}).setdefault("hflip", s.hflip)
        config = CoFTConfig.from_dict({**overrides, "seed": s.seed})
        result = adapt(s.task.train_images, s.task.class_names, method=method, backbone=s.backbone, config=config,
                       evaluation=LabelledImages(s.task.test_images, torch.tensor(s.task.test_labels)))
        precision = {}
        if s.task.train_labels is not None:
            truth = torch.tensor(s.task.train_labels)
            precision = {name: float((labels == truth[indices]).float().mean()) if len(indices) else float("nan")
                         for name, (indices, labels) in result.selections.items()}
        sizes = {name: len(indices) for name, (indices, _) in result.selections.items()}
        return {"accuracy": result.metrics["accuracy"]["final"], "stages": result.metrics["accuracy"],
                "precision": precision, "selected": sizes}
    return run


def run_zero_shot(ensemble: bool) -> Callable[[Setting], dict]:
    def run(s: Setting) -> dict:
        return {"accuracy": s.test_accuracy(baselines.zero_shot(s.backbone, s.task.class_names, ensemble))}
    return run


def run_upl(s: Setting) -> dict:
    coop = baselines.CoOpConfig(epochs=s.epochs(50), hflip=s.hflip)
    classifier = baselines.upl(s.backbone, s.task.class_names, s.task.train_images, baselines.UPLConfig(coop=coop),
                               seed=s.seed)
    return {"accuracy": s.test_accuracy(classifier)}


def run_fixmatch(distribution_alignment: bool) -> Callable[[Setting], dict]:
    def run(s: Setting) -> dict:
        config = baselines.FixMatchConfig(**{"hflip": s.hflip, **s.fixmatch,
                                             "distribution_alignment": distribution_alignment})
        config = replace(config, epochs=s.epochs(config.epochs))
        classifier, info = baselines.fixmatch(s.backbone, s.task.class_names, s.task.train_images, config, seed=s.seed)
        return {"accuracy": s.test_accuracy(classifier), **info}
    return run


def run_top_k_fine_tune(top_k: int) -> Callable[[Setting], dict]:
    def run(s: Setting) -> dict:
        phase2 = CoFTConfig().phase2.model_copy(update={"hflip": s.hflip})
        phase2 = phase2.model_copy(update={"epochs": s.epochs(phase2.epochs)})
        config = baselines.TopKFineTuneConfig(top_k=top_k, phase2=phase2)
        classifier, info = baselines.top_k_fine_tune(s.backbone, s.task.class_names, s.task.train_images, config,
                                                     seed=s.seed)
        return {"accuracy": s.test_accuracy(classifier), **info}
    return run


def labelled_shots(s: Setting, shots: int) -> tuple[list, torch.Tensor]:
    """k labelled images per class, drawn from the train split (never the test split) by the seed."""
    labels = torch.tensor(s.task.train_labels)
    chosen = baselines.sample_shots(labels, shots, seed=s.seed)
    return [s.task.train_images[i] for i in chosen.tolist()], labels[chosen]


def run_coop(shots: int) -> Callable[[Setting], dict]:
    def run(s: Setting) -> dict:
        images, labels = labelled_shots(s, shots)
        config = baselines.CoOpConfig(epochs=s.epochs(baselines.COOP_EPOCHS[shots]), hflip=s.hflip)
        return {"accuracy": s.test_accuracy(baselines.coop(s.backbone, s.task.class_names, images, labels, config,
                                                           seed=s.seed))}
    return run


def run_linear_probe(shots: int) -> Callable[[Setting], dict]:
    def run(s: Setting) -> dict:
        images, labels = labelled_shots(s, shots)
        return {"accuracy": s.test_accuracy(baselines.linear_probe(s.backbone, s.task.class_names, images, labels))}
    return run


def registry(shots: list[int]) -> dict[str, Callable[[Setting], dict]]:
    methods = {"zero-shot": run_zero_shot(False), "zero-shot-ensemble": run_zero_shot(True), "upl": run_upl,
               "fixmatch": run_fixmatch(False), "fixmatch-da": run_fixmatch(True), "topk-ft-16": run_top_k_fine_tune(16),
               "topk-ft-32": run_top_k_fine_tune(32), "coft": run_coft("coft"), "coft+": run_coft("coft+")}
    methods.update({f"coop-{k}": run_coop(k) for k in shots})
    methods.update({f"linear-probe-{k}": run_linear_probe(k) for k in shots})
    return methods


def select_methods(requested: list[str], available: dict) -> list[str]:
    groups = {"all": list(available), "label-free": LABEL_FREE,
              "few-shot": [m for m in available if m.startswith(FEW_SHOT_PREFIXES)],
              "coop": [m for m in available if m.startswith("coop-")],
              "linear-probe": [m for m in available if m.startswith("linear-probe-")]}
    chosen: list[str] = []
    for name in requested:
        if name not in groups and name not in available:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join([*groups, *available])}")
        chosen += groups.get(name, [name])
    return list(dict.fromkeys(chosen))


# --------------------------------------------------------------------------- tables


def summarise(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def print_main_table(runs: list[dict], methods: list[str], tasks: list[str], num_seeds: int) -> None:
    print(f"\n### Test accuracy (%), mean ± std over {num_seeds} seed(s); wall time per run\n")
    print("| method | labels | " + " | ".join(tasks) + " | **average** | seconds/run |")
    print("|---" * (len(tasks) + 4) + "|")
    for method in methods:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        cells = [summarise([r["accuracy"] for r in rows if r["task"] == t]) for t in tasks]
        # the average over tasks, per seed: its spread is the seed-to-seed spread of the average
        seeds = sorted({r["seed"] for r in rows})
        per_seed = [statistics.fmean(r["accuracy"] for r in rows if r["seed"] == seed) for seed in seeds]
        labels = f"{method.rsplit('-', 1)[1]}/class" if method.startswith(FEW_SHOT_PREFIXES) else "none"
        seconds = statistics.fmean(r["seconds"] for r in rows)
        print(f"| {method} | {labels} | " + " | ".join(cells) + f" | **{summarise(per_seed)}** | {seconds:.1f} |")


def print_stage_tables(runs: list[dict], method: str, tasks: list[str]) -> None:
    rows_all = [r for r in runs if r["method"] == method]
    if not rows_all:
        return
    columns = list(STAGE_COLUMNS)
    extra = sorted({k for r in rows_all for k in r["stages"] if k not in columns})  # CoFT+'s earlier rounds
    columns = columns[:1] + extra + columns[1:]
    print(f"\n### {method}: test accuracy (%) of each stage\n")
    print("| task | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for task in tasks:
        rows = [r for r in rows_all if r["task"] == task]
        print(f"| {task} | " + " | ".join(summarise([r["stages"].get(c, float("nan")) for r in rows])
                                          for c in columns) + " |")
    names = PRECISION_COLUMNS + sorted({k for r in rows_all for k in r["precision"] if k not in PRECISION_COLUMNS})
    print(f"\n### {method}: precision of the pseudo-labels on the unlabeled train split (%), (images)\n")
    print("| task | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for task in tasks:
        rows = [r for r in rows_all if r["task"] == task]
        cells = [f"{summarise([r['precision'].get(c, float('nan')) for r in rows])} "
                 f"({statistics.fmean(r['selected'].get(c, 0) for r in rows):.0f})" for c in names]
        print(f"| {task} | " + " | ".join(cells) + " |")


def print_paired_gains(runs: list[dict], method: str, tasks: list[str]) -> None:
    """`method`'s gain over every other method, paired by (task, seed): mean ± standard error, and
    how many of those tasks it wins on average. Zero-shot has no randomness: its one run pairs with
    every seed."""
    score = {(r["method"], r["task"], r["seed"]): 100 * r["accuracy"] for r in runs}
    ours = {(task, seed): value for (m, task, seed), value in score.items() if m == method and task in tasks}
    if not ours:
        return
    print(f"\n### {method}: paired gain over each method (points), mean ± s.e. over (task, seed)\n")
    print("| method | pairs | gain | tasks where the mean gain is >= 0 |")
    print("|---|---|---|---|")
    for other in dict.fromkeys(r["method"] for r in runs):
        if other == method:
            continue
        gains = {}
        for (task, seed), value in ours.items():
            theirs = score.get((other, task, seed))
            if theirs is None and other.startswith("zero-shot"):  # no randomness: its one run serves every seed
                theirs = score.get((other, task, 0))
            if theirs is not None:
                gains[(task, seed)] = value - theirs
        if len(gains) < 2:
            continue
        values = list(gains.values())
        error = statistics.stdev(values) / len(values) ** 0.5
        per_task = [statistics.fmean(g for (t, _), g in gains.items() if t == task) for task in tasks
                    if any(t == task for t, _ in gains)]
        print(f"| {other} | {len(values)} | {statistics.fmean(values):+.2f} ± {error:.2f} | "
              f"{sum(g >= 0 for g in per_task)} of {len(per_task)} |")


def print_tables(runs: list[dict], methods: list[str], tasks: list[str], num_seeds: int) -> None:
    print_main_table(runs, methods, tasks, num_seeds)
    for method in ("coft", "coft+"):
        print_stage_tables(runs, method, tasks)
        print_paired_gains(runs, method, tasks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="*", default=["all"])
    parser.add_argument("--shots", nargs="*", type=int, default=[1, 2, 4, 8, 16], choices=sorted(baselines.COOP_EPOCHS))
    parser.add_argument("--tasks", nargs="*", default=None, choices=[*TASKS, *DEV_TASKS],
                        help="default: every benchmark task (none with --data); the development tasks only when named")
    parser.add_argument("--data", nargs="*", type=Path, default=[],
                        help="datasets on disk: DIR/test/<class>/ and DIR/train/<class>/ or DIR/unlabeled/")
    parser.add_argument("--no-flip", action="store_true",
                        help="--data's classes change when mirrored (digits, text): no horizontal flips")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--num-train", type=int, default=None, help="unlabeled images per task (default: task's)")
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help=f"tasks {', '.join(QUICK_TASKS)}, 300 train / 200 test images, 1 seed, shots 1 4 16, "
                             f"short schedules: a smoke run of every method in under 10 minutes on 2 cores")
    parser.add_argument("--model", default="proxy")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--config", type=Path, help="JSON overrides of the CoFT/CoFT+ config")
    parser.add_argument("--fixmatch", type=json.loads, default={},
                        help='FixMatchConfig overrides for fixmatch and fixmatch-da, as JSON: \'{"lr": 1e-4}\'')
    parser.add_argument("--json", type=Path, help="also write every run as JSON here")
    parser.add_argument("--shard", default="0/1", help="I/N: run only every N-th (task, seed) pair, from the "
                        "I-th; N processes with one torch thread each use the cores better than one with N")
    parser.add_argument("--tables-from", nargs="*", type=Path,
                        help="print the tables of runs saved with --json (e.g. by the shards), train nothing; "
                             "where files hold the same method, task and seed, the later file's run is used")
    args = parser.parse_args(argv)
    if args.tables_from:
        latest = {(r["method"], r["task"], r["seed"]): r for path in args.tables_from for r in json.loads(path.read_text())}
        runs = list(latest.values())
        proxy_order = [t for t in [*TASKS, *DEV_TASKS] if any(r["task"] == t for r in runs)]
        tasks = proxy_order + [t for t in dict.fromkeys(r["task"] for r in runs) if t not in proxy_order]
        print_tables(runs, list(dict.fromkeys(r["method"] for r in runs)), tasks, 1 + max(r["seed"] for r in runs))
        return
    shard, shards = (int(part) for part in args.shard.split("/"))
    overrides = json.loads(args.config.read_text()) if args.config else {}
    epoch_factor = 1.0
    if args.quick:
        if args.tasks is None and not args.data:
            args.tasks = QUICK_TASKS
        args.seeds = args.seeds or 1
        args.num_train, args.num_test = args.num_train or 300, args.num_test or 200
        if args.shots == parser.get_default("shots"):
            args.shots = [1, 4, 16]
        overrides = {**QUICK_OVERRIDES, **overrides}
        epoch_factor = QUICK_EPOCH_FACTOR
    if args.tasks is None:
        args.tasks = [] if args.data else list(TASKS)
    args.seeds = args.seeds or 3
    available = registry(args.shots)
    methods = select_methods(args.methods, available)
    folders = {}
    few_shot = [m for m in methods if m.startswith(FEW_SHOT_PREFIXES)]
    for root in args.data:
        task = folder_task(root, flip_invariant=not args.no_flip)
        if task.name in folders or task.name in args.tasks:
            raise SystemExit(f"two tasks are named {task.name!r}")
        if task.train_labels is None and few_shot:
            raise SystemExit(f"{root} has no train/<class>/ folders, so it has no shots for {', '.join(few_shot)}")
        folders[task.name] = task

    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone(args.model, args.pretrained, args.device)
    runs = []
    started = time.perf_counter()
    names = [*args.tasks, *folders]
    pairs = [(name, seed) for name in names for seed in range(args.seeds)][shard::shards]
    for name in dict.fromkeys(name for name, _ in pairs):
        task = folders.get(name) or proxy_task(name, args.num_train, args.num_test)
        for method in methods:
            for seed in [seed for task_name, seed in pairs if task_name == name]:
                if method in DETERMINISTIC and seed != 0:
                    continue
                setting = Setting(task, backbone, seed, overrides, args.fixmatch, epoch_factor)
                began = time.perf_counter()
                run = available[method](setting)
                run.update({"task": name, "method": method, "seed": seed, "seconds": time.perf_counter() - began})
                runs.append(run)
                print(f"{name} {method} seed {seed}: {100 * run['accuracy']:.1f} ({run['seconds']:.1f}s)", flush=True)
                if args.json:  # after every run, so that a long sweep stopped early keeps what it measured
                    args.json.write_text(json.dumps(runs, indent=2))
    print_tables(runs, methods, names, args.seeds)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f}s, backbone {args.model}, "
          f"torch threads {torch.get_num_threads()}, device {backbone.device}, {len(names)} task(s)"
          + (f", {args.num_train or 'default'} train / {args.num_test or 'default'} test images per proxy task"
             if args.tasks else "")
          + "".join(f"; {t.name}: {len(t.train_images)} train / {len(t.test_images)} test" for t in folders.values()))


if __name__ == "__main__":
    main()

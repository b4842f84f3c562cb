"""Choose the hyperparameters the spec leaves open on the DEVELOPMENT tasks, never on the benchmark's.

    python benchmarks/tune_dev.py pipeline '{}' '{"pseudo_labels": {"top_k": 32}}' [--method coft+]
        one whole CoFT (or CoFT+) run per override set and dev task: the accuracy of every stage, the
        precision of its pseudo-labels, and each trained model's agreement with its own training labels.
    python benchmarks/tune_dev.py phase2 '{"lr": 0.0005}' '{"lr": 0.005, "crop_scale_min": 0.8}'
        Phase II alone, on the clean sets of a default CoFT run (cached per task and seed), one
        line per override set: each Phase II model, their average, and the training CE (label-free);
        first a `phase1` line, the Phase I models those clean sets come from.
        `--interpolations 0.5 1.0` also scores each trained pair at those WiSE-FT fractions;
        `--true-labels` trains on the clean images' true labels instead (what a perfect filter gives).
    python benchmarks/tune_dev.py filter [--thresholds 0.6 0.8]
        the filter of that cached run: precision of the kept and rejected labels (and of as many
        labels kept by the labelling model's own confidence), and how well the other model's p_clean
        ranks right labels above wrong ones (AUROC) next to that confidence.

Tasks: coft.proxy.tasks.DEV_TASKS, 1,000 train (`--num-train`, pipeline mode) and 300 test images;
`--seeds` (default 0).
Labels are used only to measure. Every run starts from `{"phase1": {"hflip": false},
"phase2": {"hflip": false}}`, as the benchmark does for tasks that mirroring changes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coft.backbone import load_backbone  # noqa: E402
from coft.classifier import Classifier  # noqa: E402
from coft.config import CoFTConfig  # noqa: E402
from coft.image_cache import cached_images  # noqa: E402
from coft.phase2 import fine_tune, fresh_classifier, interpolate_weights, s_star_weights  # noqa: E402
from coft.pipeline import LabelledImages, adapt  # noqa: E402
from coft.proxy.tasks import DEV_TASKS, load_task  # noqa: E402

NO_FLIP = {"phase1": {"hflip": False}, "phase2": {"hflip": False}}
CACHE = Path("/tmp/coft-tune-dev")


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _run(task, seed: int, overrides: dict, checkpoint_dir: Path | None = None, method: str = "coft"):
    config = CoFTConfig.from_dict(_merge(NO_FLIP, overrides) | {"seed": seed})
    evaluation = LabelledImages(task.test_images, torch.tensor(task.test_labels))
    return adapt(task.train_images, task.class_names, method=method, config=config, device="cpu",
                 checkpoint_dir=checkpoint_dir, evaluation=evaluation)


def pipeline(tasks: list[str], seeds: list[int], override_sets: list[dict], method: str = "coft",
             num_train: int = 1000) -> None:
    for name in tasks:
        task = load_task(name, num_train, 300)
        for overrides in override_sets:
            for seed in seeds:
                started = time.perf_counter()
                result = _run(task, seed, overrides, method=method)
                accuracy = {k: round(100 * v, 1) for k, v in result.metrics["accuracy"].items()}
                truth = torch.tensor(task.train_labels)
                precision = {}
                for key, (indices, labels) in result.selections.items():
                    precision[key] = f"{100 * float((labels == truth[indices]).float().mean()):.1f} ({len(indices)})"
                fits = {stage: round(100 * fit["agreement"], 1) for stage, fit in result.metrics.get("fit", {}).items()}
                label = name if num_train == 1000 else f"{name}@{num_train}"  # the size of U, when not the default
                print(f"{label} {method} seed {seed} {json.dumps(overrides)}: test {accuracy}; label precision (images) {precision}; "
                      f"training-label agreement {fits}; {time.perf_counter() - started:.0f}s", flush=True)


def phase2(tasks: list[str], seeds: list[int], override_sets: list[dict],
           interpolations: list[float] | None = None, true_labels: bool = False) -> None:
    backbone = load_backbone("proxy", device="cpu")
    for name in tasks:
        task = load_task(name, 1000, 300)
        train_images = cached_images(task.train_images, backbone.preprocess_cfg, backbone.device)
        test_images = cached_images(task.test_images, backbone.preprocess_cfg, backbone.device, train_scale=None)
        for seed in seeds:
            filtered = _cached_filter(task, name, seed)
            _print_phase1(name, seed)
            zero_shot = torch.load(CACHE / f"{name}-seed{seed}" / "zero-shot.pt", weights_only=True)
            text = zero_shot["text_features"]
            for overrides in override_sets:
                config = CoFTConfig.from_dict(_merge(NO_FLIP, {"phase2": overrides}))
                started = time.perf_counter()
                members, starts, final_ce = [], [], []
                for which in (0, 1):
                    model = fresh_classifier(backbone, text, config.phase2)  # as the pipeline makes it
                    if interpolations:  # the starting weights, only when something interpolates toward them
                        starts.append(copy.deepcopy(model.state_dict()))
                    torch.manual_seed(seed * 1000 + which)
                    # --true-labels: the same clean images, each with its true class (a perfect filter's
                    # labels at this coverage); labels are otherwise used only to measure.
                    labels = torch.tensor(task.train_labels) if true_labels else filtered["labels"][which]
                    weights = s_star_weights(len(labels), zero_shot["s_star_indices"], config.phase2.s_star_weight)
                    history = fine_tune(model, backbone, train_images, labels,
                                        filtered["clean"][which], config.phase2, seed * 1000 + which, weights=weights)
                    members.append(model)
                    final_ce.append(round(history[-1]["ce"], 3))
                elapsed = time.perf_counter() - started
                truth = torch.tensor(task.test_labels)
                # One training, several WiSE-FT fractions: interpolating needs no retraining.
                for fraction in interpolations or [None]:
                    evaluated = members
                    if fraction is not None:
                        evaluated = [copy.deepcopy(m) for m in members]
                        for member, start in zip(evaluated, starts):
                            interpolate_weights(member, start, fraction)
                    accuracy = []
                    for i in (0, 1):
                        single = Classifier([evaluated[i]], task.class_names, backbone.model_cfg, backbone.preprocess_cfg)
                        accuracy.append(float((single.predict(test_images).indices == truth).float().mean()))
                    both = Classifier(evaluated, task.class_names, backbone.model_cfg, backbone.preprocess_cfg)
                    accuracy.append(float((both.predict(test_images).indices == truth).float().mean()))
                    label = (json.dumps(overrides) + (" on true labels" if true_labels else "")
                             + ("" if fraction is None else f" interpolated {fraction}"))
                    print(f"{name} seed {seed} phase2 {label}: test model1/model2/final "
                          f"{' / '.join(f'{100 * a:.1f}' for a in accuracy)}; train CE {final_ce}; "
                          f"{elapsed:.0f}s", flush=True)


def _cached_filter(task, name: str, seed: int) -> dict:
    """The filter of a default CoFT run on a dev task, up to Phase II (run once, then cached)."""
    directory = CACHE / f"{name}-seed{seed}"
    if not (directory / "filter.pt").exists():
        # The filter does not depend on Phase II, which the phase2 mode runs itself: none here.
        result = _run(task, seed, {"phase2": {"epochs": 0}}, checkpoint_dir=directory)
        # Phase I's test accuracy, so Phase II alone can be read against the models it starts from.
        accuracy = {k: round(100 * v, 1) for k, v in result.metrics["accuracy"].items()
                    if not k.startswith(("phase2", "final"))}
        (directory / "accuracy.json").write_text(json.dumps(accuracy))
    return torch.load(directory / "filter.pt", weights_only=True)


def _print_phase1(name: str, seed: int) -> None:
    """The cached run's Phase I models, in phase2's line format without "final" (paired.py reads it)."""
    path = CACHE / f"{name}-seed{seed}" / "accuracy.json"
    if path.exists():
        before = json.loads(path.read_text())
        print(f"{name} seed {seed} phase2 phase1: test model1/model2/final {before['phase1_model1']:.1f} / "
              f"{before['phase1_model2']:.1f}; zero-shot {before['zero_shot']:.1f}", flush=True)


def _auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative): 0.5 is no signal."""
    return float((scores[positive][:, None] > scores[~positive][None, :]).float().mean())


def filter_quality(tasks: list[str], seeds: list[int], thresholds: list[float] | None = None) -> None:
    """How well each model's clean set separates right labels from wrong ones (labels only to measure);
    `thresholds`: also the size and precision of the stricter sets p_clean > t."""
    for name in tasks:
        task = load_task(name, 1000, 300)
        truth = torch.tensor(task.train_labels)
        for seed in seeds:
            filtered = _cached_filter(task, name, seed)
            agree = filtered["labels"][0] == filtered["labels"][1]
            for which in (0, 1):
                labels, clean = filtered["labels"][which], filtered["clean"][which].bool()
                right = labels == truth
                confidence = filtered["confidence"][which]
                surest = confidence.argsort(descending=True)[:int(clean.sum())]  # as many, by the labeller's confidence
                print(f"{name} seed {seed} model {which + 1}: labels on U {100 * right.float().mean():.1f}% right; "
                      f"kept {int(clean.sum())} at {100 * right[clean].float().mean():.1f}% (as many by own confidence: "
                      f"{100 * right[surest].float().mean():.1f}%), rejected "
                      f"{int((~clean).sum())} at {100 * right[~clean].float().mean():.1f}%; AUROC of the other "
                      f"model's p_clean {_auroc(filtered['p_clean'][which], right):.3f}, of the labelling model's "
                      f"own confidence {_auroc(confidence, right):.3f}; the two models agree on {int(agree.sum())} "
                      f"at {100 * right[agree].float().mean():.1f}%", flush=True)
                if thresholds:
                    p_clean = filtered["p_clean"][which]
                    stricter = [f"p_clean > {t}: {int((p_clean > t).sum())} at "
                                f"{100 * right[p_clean > t].float().mean():.1f}%" for t in thresholds]
                    print(f"{name} seed {seed} model {which + 1}: {'; '.join(stricter)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["pipeline", "phase2", "filter"])
    parser.add_argument("overrides", nargs="*", type=json.loads)
    parser.add_argument("--tasks", nargs="*", default=list(DEV_TASKS), choices=list(DEV_TASKS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--method", default="coft", choices=["coft", "coft+"], help="pipeline mode only")
    parser.add_argument("--num-train", type=int, default=1000,
                        help="pipeline mode only: the size of U (a choice should hold at more than one)")
    parser.add_argument("--interpolations", nargs="*", type=float, default=None,
                        help="phase2 mode only: also evaluate each trained pair at these WiSE-FT fractions")
    parser.add_argument("--true-labels", action="store_true",
                        help="phase2 mode only: train on the clean images' TRUE labels (a perfect filter's)")
    parser.add_argument("--thresholds", nargs="*", type=float, default=None,
                        help="filter mode only: also the sets whose p_clean exceeds each of these")
    args = parser.parse_args()
    if args.mode != "filter" and not args.overrides:
        parser.error(f"{args.mode} needs at least one override set, e.g. '{{}}'")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # 1 each for runs side by side
    if args.mode == "filter":
        filter_quality(args.tasks, args.seeds, args.thresholds)
    elif args.mode == "pipeline":
        pipeline(args.tasks, args.seeds, args.overrides, args.method, args.num_train)
    else:
        phase2(args.tasks, args.seeds, args.overrides, args.interpolations, args.true_labels)


if __name__ == "__main__":
    main()

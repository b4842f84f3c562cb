"""Choose the hyperparameters the spec leaves open on the DEVELOPMENT tasks, never on the benchmark's.

    python benchmarks/tune_dev.py pipeline '{}' '{"pseudo_labels": {"top_k": 32}}' [--method coft+]
        one whole CoFT (or CoFT+) run per override set and dev task: the accuracy of every stage.
    python benchmarks/tune_dev.py phase2 '{"lr": 0.0005}' '{"lr": 0.005, "crop_scale_min": 0.8}'
        Phase II alone, on the clean sets of a default CoFT run (cached per task and seed), one
        line per override set: each Phase II model, their average, and the training CE (label-free).

Tasks: coft.proxy.tasks.DEV_TASKS, 1,000 train and 300 test images; `--seeds` (default 0).
Labels are used only to measure. Every run starts from `{"phase1": {"hflip": false},
"phase2": {"hflip": false}}`, as the benchmark does for tasks that mirroring changes.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coft.backbone import load_backbone  # noqa: E402
from coft.classifier import Classifier, ImageClassifier, text_head  # noqa: E402
from coft.config import CoFTConfig  # noqa: E402
from coft.phase2 import fine_tune  # noqa: E402
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


def pipeline(tasks: list[str], seeds: list[int], override_sets: list[dict], method: str = "coft") -> None:
    for name in tasks:
        task = load_task(name, 1000, 300)
        for overrides in override_sets:
            for seed in seeds:
                started = time.perf_counter()
                result = _run(task, seed, overrides, method=method)
                accuracy = {k: round(100 * v, 1) for k, v in result.metrics["accuracy"].items()}
                truth = torch.tensor(task.train_labels)
                precision = {}
                for key, (indices, labels) in result.selections.items():
                    precision[key] = round(100 * float((labels == truth[indices]).float().mean()), 1)
                print(f"{name} {method} seed {seed} {json.dumps(overrides)}: test {accuracy}; label precision {precision}; "
                      f"{time.perf_counter() - started:.0f}s", flush=True)


def phase2(tasks: list[str], seeds: list[int], override_sets: list[dict]) -> None:
    backbone = load_backbone("proxy", device="cpu")
    for name in tasks:
        task = load_task(name, 1000, 300)
        for seed in seeds:
            directory = CACHE / f"{name}-seed{seed}"
            if not (directory / "filter.pt").exists():
                _run(task, seed, {}, checkpoint_dir=directory)
            filtered = torch.load(directory / "filter.pt", weights_only=True)
            text = torch.load(directory / "zero-shot.pt", weights_only=True)["text_features"]
            for overrides in override_sets:
                config = CoFTConfig.from_dict(_merge(NO_FLIP, {"phase2": overrides}))
                started = time.perf_counter()
                members, final_ce = [], []
                for which in (0, 1):
                    model = ImageClassifier(copy.deepcopy(backbone.model.visual), text_head(text, backbone.logit_scale))
                    torch.manual_seed(seed * 1000 + which)
                    history = fine_tune(model, backbone, task.train_images, filtered["labels"][which],
                                        filtered["clean"][which], config.phase2, seed * 1000 + which)
                    members.append(model)
                    final_ce.append(round(history[-1]["ce"], 3))
                truth = torch.tensor(task.test_labels)
                accuracy = []
                for i in (0, 1):
                    single = Classifier([members[i]], task.class_names, backbone.model_cfg, backbone.preprocess_cfg)
                    accuracy.append(float((single.predict(task.test_images).indices == truth).float().mean()))
                both = Classifier(members, task.class_names, backbone.model_cfg, backbone.preprocess_cfg)
                accuracy.append(float((both.predict(task.test_images).indices == truth).float().mean()))
                print(f"{name} seed {seed} phase2 {json.dumps(overrides)}: test model1/model2/final "
                      f"{' / '.join(f'{100 * a:.1f}' for a in accuracy)}; train CE {final_ce}; "
                      f"{time.perf_counter() - started:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["pipeline", "phase2"])
    parser.add_argument("overrides", nargs="+", type=json.loads)
    parser.add_argument("--tasks", nargs="*", default=list(DEV_TASKS), choices=list(DEV_TASKS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--method", default="coft", choices=["coft", "coft+"], help="pipeline mode only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.mode == "pipeline":
        pipeline(args.tasks, args.seeds, args.overrides, args.method)
    else:
        phase2(args.tasks, args.seeds, args.overrides)


if __name__ == "__main__":
    main()

"""Stage diagnostics on a proxy task, to find where CoFT's gain is lost (labels used only to measure).

    python benchmarks/diagnose.py phase1 shapes-outlined-cast '{"phase1": {"vpt_tokens": 0}}'
        zero-shot -> S* -> one Phase I model: S* precision, test accuracy of zero-shot and of the
        model's positive prompts, and its accuracy on all of U (what the filter starts from).
    python benchmarks/diagnose.py phase1 digits-occluded '{}' random-true [SEED]
        the same Phase I model trained on a set as large as S* but chosen differently: `s-star-true`
        (S* with its TRUE labels: no label noise), `random-true` (random images, true labels: no
        noise and no selection bias), `random-zero-shot` (random images, zero-shot labels). With
        `--coop` last, CoOp is trained on the same images and labels for the same number of steps.
        `all-true` trains on every image of U with its true label: with `phase2-ceiling` at noise 0,
        what the frozen features allow prompts against what fine-tuning the tower reaches.
    python benchmarks/diagnose.py rounds dev-shapes-occluded-wood grow 0
        CoFT+'s iterative Phase I for one model, three rounds: each round's S* (size, precision) and
        the model's test accuracy, with round r's S* the top-K (`constant`, the spec) or the top-r*K
        (`grow`) per class of round r-1's model; the last argument offsets the seeds.
    python benchmarks/diagnose.py phase2-ceiling digits-unseen-fonts 0.0 '{"lr": 0.005}' [SEED]
        Phase II alone on the TRUE train labels (a fraction replaced at random), its head built as
        the pipeline builds it: what fine-tuning could reach with perfect (or uniformly noisy) labels.
All use 1,000 train and 300 test images; the seed defaults to 0.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coft.backbone import load_backbone  # noqa: E402
from coft.classifier import Classifier  # noqa: E402
from coft.config import CoFTConfig, Phase2Config  # noqa: E402
from coft.baselines import CoOpConfig, encode_images, train_coop  # noqa: E402
from coft.image_cache import cached_images  # noqa: E402
from coft.phase1 import score_images, train_prompt_model  # noqa: E402
from coft.phase2 import fine_tune, fresh_classifier  # noqa: E402
from coft.prompts import class_text_features  # noqa: E402
from coft.proxy.tasks import load_task  # noqa: E402
from coft.pseudo_labels import top_k_per_class  # noqa: E402
from coft.training import epochs_for, steps_per_epoch  # noqa: E402


def _zero_shot_logits(backbone, text: torch.Tensor, images) -> torch.Tensor:
    """Zero-shot logits, as the pipeline ranks S*."""
    return backbone.logit_scale * encode_images(backbone, images, 256) @ text.T


def _sources(backbone, task):
    """The task's splits decoded once: train rows for the train split, test rows for both."""
    return (cached_images(task.train_images, backbone.preprocess_cfg, backbone.device),
            cached_images(task.test_images, backbone.preprocess_cfg, backbone.device, train_scale=None))


def _accuracy(predicted: torch.Tensor, truth: list[int]) -> float:
    return float((predicted == torch.tensor(truth)).float().mean())


TRAINING_SETS = ("s-star", "s-star-true", "random-true", "random-zero-shot", "all-true")


def phase1(task_name: str, overrides: dict, training_set: str = "s-star", seed: int = 0,
           with_coop: bool = False) -> None:
    backbone = load_backbone("proxy", device="cpu")
    task = load_task(task_name, 1000, 300)
    train_images, test_images = _sources(backbone, task)
    # No flips for digits, unless the overrides say otherwise (merged per section, not replaced).
    config = CoFTConfig.from_dict({**overrides, "phase1": {"hflip": False, **overrides.get("phase1", {})}})
    text = class_text_features(backbone, task.class_names, [config.pseudo_labels.template])

    train_logits = _zero_shot_logits(backbone, text, train_images)
    top_k = config.pseudo_labels.images_per_class(len(task.train_labels), len(task.class_names))
    indices, labels = top_k_per_class(train_logits.softmax(dim=1), top_k)
    truth = torch.tensor(task.train_labels)
    if training_set == "all-true":
        indices = torch.arange(len(truth))
    if training_set.startswith("random"):
        zero_shot_labels = train_logits.argmax(dim=1)
        indices = torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))[:len(indices)]
        labels = zero_shot_labels[indices]
    if training_set.endswith("true"):
        labels = truth[indices]
    started = time.perf_counter()
    torch.manual_seed(seed)
    model, history = train_prompt_model(backbone, task.class_names, train_images, indices, labels,
                                        config.phase1, seed=10 + 1000 * seed)
    seconds = time.perf_counter() - started
    test_pos, _ = score_images(model, backbone, test_images, 256)
    train_pos, _ = score_images(model, backbone, train_images, 256)
    steps = epochs_for(len(indices), config.phase1.batch_size, config.phase1.epochs, config.phase1.min_steps) * \
        steps_per_epoch(len(indices), config.phase1.batch_size)
    fitted = float((train_pos[indices].argmax(dim=1) == labels).float().mean())
    coop_accuracy = ""
    if with_coop:  # CoOp on the same images and labels, for the same number of steps (CoOp's own recipe)
        torch.manual_seed(seed)
        coop = train_coop(backbone, task.class_names, train_images, indices, labels,
                          CoOpConfig(hflip=config.phase1.hflip, min_steps=steps), seed=10 + 1000 * seed, epochs=1)
        coop_accuracy = f", CoOp at the same steps {_accuracy(coop.predict(test_images).indices, task.test_labels):.3f}"
    print(f"{task_name} {json.dumps(overrides)} trained on {training_set} seed {seed}: |S*| {len(indices)}, S* precision "
          f"{float((labels == truth[indices]).float().mean()):.3f}; test accuracy zero-shot "
          f"{_accuracy(_zero_shot_logits(backbone, text, test_images).argmax(dim=1), task.test_labels):.3f}, Phase I "
          f"{_accuracy(test_pos.argmax(dim=1), task.test_labels):.3f}{coop_accuracy}; Phase I on U "
          f"{_accuracy(train_pos.argmax(dim=1), task.train_labels):.3f}; {steps} steps, fits its training labels "
          f"{fitted:.3f}, final L1 {history[-1]['l1']:.3f} L2 {history[-1]['l2']:.3f} ({seconds:.0f}s)", flush=True)


def rounds_setup(task_name: str, num_train: int = 1000):
    """What a rounds diagnostic starts from: the proxy, the task and its decoded splits, the default
    config without flips, K, and zero-shot's softmax on the train split."""
    backbone = load_backbone("proxy", device="cpu")
    task = load_task(task_name, num_train, 300)
    train_images, test_images = _sources(backbone, task)
    config = CoFTConfig.from_dict({"phase1": {"hflip": False}})
    k = config.pseudo_labels.images_per_class(len(task.train_labels), len(task.class_names))
    text = class_text_features(backbone, task.class_names, [config.pseudo_labels.template])
    zero_shot = _zero_shot_logits(backbone, text, train_images).softmax(dim=1)
    return backbone, task, train_images, test_images, config, k, zero_shot


def rounds(task_name: str, round_top_k: str, seed: int, num_rounds: int = 3) -> None:
    backbone, task, train_images, test_images, config, k, zero_shot = rounds_setup(task_name)
    indices, labels = top_k_per_class(zero_shot, k)
    truth = torch.tensor(task.train_labels)
    lines = []
    for round_ in range(1, num_rounds + 1):
        model, _ = train_prompt_model(backbone, task.class_names, train_images, indices, labels, config.phase1,
                                      seed=10 + 100 * round_ + 1000 * seed)
        test_pos, _ = score_images(model, backbone, test_images, 256)
        train_pos, _ = score_images(model, backbone, train_images, 256)
        lines.append(f"round {round_}: S* {len(indices)} at {100 * float((labels == truth[indices]).float().mean()):.1f}% "
                     f"-> test {100 * _accuracy(test_pos.argmax(dim=1), task.test_labels):.1f}, "
                     f"on U {100 * _accuracy(train_pos.argmax(dim=1), task.train_labels):.1f}")
        next_k = k * (round_ + 1) if round_top_k == "grow" else k
        indices, labels = top_k_per_class((train_pos * model.scale).softmax(dim=1), next_k)
    print(f"{task_name} {round_top_k} seed {seed}: " + " | ".join(lines), flush=True)


def phase2_ceiling(task_name: str, noise: float, overrides: dict, seed: int = 0) -> None:
    backbone = load_backbone("proxy", device="cpu")
    task = load_task(task_name, 1000, 300)
    train_images, test_images = _sources(backbone, task)
    labels = torch.tensor(task.train_labels)
    generator = torch.Generator().manual_seed(0)
    replaced = torch.rand(len(labels), generator=generator) < noise
    labels = torch.where(replaced, torch.randint(0, len(task.class_names), labels.shape, generator=generator), labels)
    config = Phase2Config(**({"hflip": False} | overrides))
    text = class_text_features(backbone, task.class_names, [CoFTConfig().pseudo_labels.template])
    model = fresh_classifier(backbone, text, config)
    torch.manual_seed(seed)
    history = fine_tune(model, backbone, train_images, labels, torch.ones(len(labels), dtype=torch.bool),
                        config, seed=10 + 1000 * seed)
    classifier = Classifier([model], task.class_names, backbone.model_cfg, backbone.preprocess_cfg)
    precision = float((labels == torch.tensor(task.train_labels)).float().mean())
    print(f"{task_name} noise {noise} {json.dumps(overrides)} seed {seed}: label precision {precision:.3f}, test accuracy "
          f"{_accuracy(classifier.predict(test_images).indices, task.test_labels):.3f}, "
          f"train CE after {len(history)} epochs {history[-1]['ce']:.2f}")


if __name__ == "__main__":
    command, name, *rest = sys.argv[1:]
    flags = {arg for arg in rest if arg.startswith("--")}
    rest = [arg for arg in rest if not arg.startswith("--")]
    if command == "phase1":
        training_set = rest[1] if len(rest) > 1 else "s-star"
        if training_set not in TRAINING_SETS:
            raise SystemExit(f"training set must be one of {', '.join(TRAINING_SETS)}")
        phase1(name, json.loads(rest[0]) if rest else {}, training_set, int(rest[2]) if len(rest) > 2 else 0,
               with_coop="--coop" in flags)
    elif command == "rounds":
        rounds(name, rest[0] if rest else "constant", int(rest[1]) if len(rest) > 1 else 0)
    elif command == "phase2-ceiling":
        phase2_ceiling(name, float(rest[0]) if rest else 0.0, json.loads(rest[1]) if len(rest) > 1 else {},
                       int(rest[2]) if len(rest) > 2 else 0)
    else:
        raise SystemExit(__doc__)

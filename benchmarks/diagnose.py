"""Stage diagnostics on a proxy task, to find where CoFT's gain is lost (labels used only to measure).

    python benchmarks/diagnose.py phase1 shapes-outlined-cast '{"phase1": {"vpt_tokens": 0}}'
        zero-shot -> S* -> one Phase I model: S* precision, test accuracy of zero-shot and of the
        model's positive prompts, and its accuracy on all of U (what the filter starts from).
    python benchmarks/diagnose.py phase2-ceiling digits-unseen-fonts 0.0 '{"lr": 0.005}'
        Phase II alone on the TRUE train labels (a fraction replaced at random): what fine-tuning
        could reach with perfect (or uniformly noisy) pseudo-labels.
Both use 1,000 train and 300 test images, seed 0.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coft.backbone import load_backbone  # noqa: E402
from coft.classifier import Classifier, ImageClassifier, text_head  # noqa: E402
from coft.config import CoFTConfig, Phase2Config  # noqa: E402
from coft.loader import map_batches  # noqa: E402
from coft.phase1 import score_images, train_prompt_model  # noqa: E402
from coft.phase2 import fine_tune  # noqa: E402
from coft.prompts import class_text_features  # noqa: E402
from coft.proxy.tasks import load_task  # noqa: E402
from coft.pseudo_labels import top_k_per_class  # noqa: E402


def _accuracy(predicted: torch.Tensor, truth: list[int]) -> float:
    return float((predicted == torch.tensor(truth)).float().mean())


def phase1(task_name: str, overrides: dict) -> None:
    backbone = load_backbone("proxy", device="cpu")
    task = load_task(task_name, 1000, 300)
    config = CoFTConfig.from_dict({"phase1": {"hflip": False}} | overrides)
    text = class_text_features(backbone, task.class_names, [config.pseudo_labels.template])

    def zero_shot_logits(images):
        features = map_batches(lambda p: F.normalize(backbone.model.encode_image(p), dim=-1), images,
                               backbone.eval_transform(), 256, backbone.device)
        return backbone.logit_scale * features @ text.T  # as the pipeline ranks S*

    indices, labels = top_k_per_class(zero_shot_logits(task.train_images).softmax(dim=1), config.pseudo_labels.top_k)
    truth = torch.tensor(task.train_labels)
    started = time.perf_counter()
    torch.manual_seed(0)
    model, history = train_prompt_model(backbone, task.class_names, task.train_images, indices, labels,
                                        config.phase1, seed=10)
    test_pos, _ = score_images(model, backbone, task.test_images, 256)
    train_pos, _ = score_images(model, backbone, task.train_images, 256)
    print(f"{task_name} {json.dumps(overrides)}: |S*| {len(indices)}, S* precision "
          f"{float((labels == truth[indices]).float().mean()):.3f}; test accuracy zero-shot "
          f"{_accuracy(zero_shot_logits(task.test_images).argmax(dim=1), task.test_labels):.3f}, Phase I "
          f"{_accuracy(test_pos.argmax(dim=1), task.test_labels):.3f}; Phase I on U "
          f"{_accuracy(train_pos.argmax(dim=1), task.train_labels):.3f}; final L1 {history[-1]['l1']:.3f} "
          f"({time.perf_counter() - started:.0f}s)")


def phase2_ceiling(task_name: str, noise: float, overrides: dict) -> None:
    backbone = load_backbone("proxy", device="cpu")
    task = load_task(task_name, 1000, 300)
    labels = torch.tensor(task.train_labels)
    generator = torch.Generator().manual_seed(0)
    replaced = torch.rand(len(labels), generator=generator) < noise
    labels = torch.where(replaced, torch.randint(0, len(task.class_names), labels.shape, generator=generator), labels)
    config = Phase2Config(**({"hflip": False} | overrides))
    text = class_text_features(backbone, task.class_names, ["a photo of a {}."])
    model = ImageClassifier(copy.deepcopy(backbone.model.visual), text_head(text, backbone.logit_scale))
    history = fine_tune(model, backbone, task.train_images, labels, torch.ones(len(labels), dtype=torch.bool),
                        config, seed=0)
    classifier = Classifier([model], task.class_names, backbone.model_cfg, backbone.preprocess_cfg)
    precision = float((labels == torch.tensor(task.train_labels)).float().mean())
    print(f"{task_name} noise {noise} {json.dumps(overrides)}: label precision {precision:.3f}, test accuracy "
          f"{_accuracy(classifier.predict(task.test_images).indices, task.test_labels):.3f}, "
          f"train CE after {len(history)} epochs {history[-1]['ce']:.2f}")


if __name__ == "__main__":
    command, name, *rest = sys.argv[1:]
    if command == "phase1":
        phase1(name, json.loads(rest[0]) if rest else {})
    elif command == "phase2-ceiling":
        phase2_ceiling(name, float(rest[0]) if rest else 0.0, json.loads(rest[1]) if len(rest) > 1 else {})
    else:
        raise SystemExit(__doc__)

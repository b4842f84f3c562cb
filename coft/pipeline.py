"""One function runs a whole adaptation: `adapt(images, class_names, method=...)`.

Stages, each checkpointed into `checkpoint_dir` when one is given, so an interrupted run resumes
where it stopped:
    zero-shot  pseudo-labels for all of U, and S* (top-K per class)
    phase1     two prompt models, each trained on S*              (CoFT)
    filter     each model labels U, the other validates            (CoFT)
    phase2     two fresh vision towers + heads, fully fine-tuned   (CoFT)
    finish     the classifier, its predictions on U, quality signals
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from coft.backbone import PROXY_MODEL, Backbone, load_backbone
from coft.classifier import Classifier, ImageClassifier, Predictions, text_head, zero_shot_classifier
from coft.config import CoFTConfig
from coft.loader import map_batches
from coft.losses import clean_probability
from coft.phase1 import PromptModel, score_images, train_prompt_model
from coft.phase2 import fine_tune
from coft.progress import ProgressCallback, ProgressTracker
from coft.prompts import TEMPLATE_ENSEMBLE, class_text_features
from coft.pseudo_labels import top_k_per_class, validated_by

METHODS = ("zero-shot", "coft")


@dataclass
class LabelledImages:
    """An optional labelled holdout: used only to report true accuracy, never to train."""

    images: Sequence[Image.Image]
    labels: torch.Tensor  # indices into the job's class names


@dataclass
class AdaptResult:
    classifier: Classifier
    predictions: Predictions  # the classifier's predictions on the adapted images themselves
    metrics: dict[str, Any] = field(default_factory=dict)
    # Which images the method trusted, with which labels: name -> (indices into the images, labels).
    # "zero_shot": all images; "s_star": the top-K per class; "clean_model{1,2}": each Phase II set.
    selections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def adapt(images: Sequence[Image.Image], class_names: Sequence[str], *, method: str = "coft",
          backbone: Backbone | None = None, model: str = PROXY_MODEL, pretrained: str | None = None,
          config: CoFTConfig | None = None, progress: ProgressCallback | None = None,
          checkpoint_dir: str | os.PathLike | None = None, evaluation: LabelledImages | None = None,
          device: str | torch.device | None = None) -> AdaptResult:
    """Adapt a CLIP backbone to `class_names` using the unlabeled `images`.

    `backbone` (already loaded) wins over `model`/`pretrained`. `progress` receives Progress events
    and may raise to stop the run. `evaluation` adds true accuracies to the metrics.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    class_names = _check_class_names(class_names)
    if len(images) == 0:
        raise ValueError("no images to adapt on")
    config = config or CoFTConfig()
    backbone = backbone or load_backbone(model, pretrained, device)
    run = _Run(images, class_names, method, backbone, config, progress, checkpoint_dir, evaluation)
    return run.execute()


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(n).strip() for n in class_names]
    if len(names) < 2:
        raise ValueError("at least two class names are needed")
    if any(not n for n in names):
        raise ValueError("class names must not be blank")
    if len(set(n.lower() for n in names)) != len(names):
        raise ValueError("class names must be distinct")
    return names


class _Run:
    def __init__(self, images, class_names, method, backbone, config, progress, checkpoint_dir, evaluation):
        self.images, self.class_names, self.method = images, class_names, method
        self.backbone, self.config, self.evaluation = backbone, config, evaluation
        self.checkpoints = _Checkpoints(checkpoint_dir, self._fingerprint()) if checkpoint_dir else None
        self.tracker = ProgressTracker(progress, self._stage_costs())
        self.metrics: dict[str, Any] = {"method": method, "num_images": len(images), "num_classes": len(class_names)}
        self.tracker.metrics = self.metrics

    # -- the stages ----------------------------------------------------------------------------

    def execute(self) -> AdaptResult:
        zero_shot = self._stage("zero-shot", self._zero_shot)
        if self.method == "zero-shot":
            members = list(zero_shot_classifier(self.backbone, self.class_names, zero_shot["text_features"]).members)
            return self._finish(members, self.backbone, zero_shot)
        prompt_models = [self._phase1_model(i, zero_shot) for i in (1, 2)]
        filtered = self._stage("filter", lambda report: self._filter(prompt_models, report))
        phase2_backbone = self._phase2_backbone()
        members = [self._phase2_model(i, filtered, phase2_backbone) for i in (1, 2)]
        return self._finish(members, phase2_backbone, zero_shot, filtered, prompt_models)

    def _zero_shot(self, report) -> dict[str, Any]:
        text_features = self._initial_text_features()
        scale = self.backbone.logit_scale
        image_features = self._encode(self.backbone, report)
        # Stage results live on the CPU, as they do when loaded from a checkpoint (and DataLoader
        # workers cannot touch CUDA tensors).
        probabilities = (scale * image_features @ text_features.T).softmax(dim=1).cpu()
        indices, labels = top_k_per_class(probabilities, self.config.pseudo_labels.top_k)
        return {"text_features": text_features.cpu(), "probabilities": probabilities,
                "s_star_indices": indices, "s_star_labels": labels}

    def _phase1_model(self, which: int, zero_shot: dict) -> PromptModel:
        stage = f"phase1-model{which}"

        def train(report):
            model, history = train_prompt_model(
                self.backbone, self.class_names, self.images, zero_shot["s_star_indices"],
                zero_shot["s_star_labels"], self.config.phase1, self._seed(which), self.config.num_workers, report)
            return {"state": model.state_dict(), "history": history}

        saved = self._stage(stage, train)
        self.metrics[f"phase1_model{which}_losses"] = saved["history"]
        model = PromptModel(self.backbone, self.class_names, self.config.phase1, self._seed(which))
        model.load_state_dict(saved["state"])
        return model.eval()

    def _filter(self, prompt_models: list[PromptModel], report) -> dict[str, Any]:
        scores = []
        for i, model in enumerate(prompt_models):
            scores.append(score_images(model, self.backbone, self.images, self.config.eval_batch_size,
                                       self.config.num_workers, lambda f, m, i=i: report((i + f) / 2, m)))
        (pos1, neg1), (pos2, neg2) = scores
        labels1, labels2 = pos1.argmax(dim=1), pos2.argmax(dim=1)
        scale = self.backbone.logit_scale
        rows = torch.arange(len(labels1))
        return {
            "labels": [labels1, labels2],
            # Model 2 validates model 1's labels, and model 1 validates model 2's.
            "clean": [validated_by(labels1, pos2, neg2), validated_by(labels2, pos1, neg1)],
            "p_clean": [clean_probability(pos2[rows, labels1], neg2[rows, labels1], scale),
                        clean_probability(pos1[rows, labels2], neg1[rows, labels2], scale)],
            "phase1_predictions": [pos1.softmax(dim=1), pos2.softmax(dim=1)],
        }

    def _phase2_backbone(self) -> Backbone:
        phase2 = self.config.phase2
        if phase2.backbone is None:
            return self.backbone
        return load_backbone(phase2.backbone, phase2.backbone_pretrained, self.backbone.device)

    def _phase2_model(self, which: int, filtered: dict, backbone: Backbone) -> ImageClassifier:
        stage = f"phase2-model{which}"
        text_features = self._initial_text_features(backbone)

        def fresh_model() -> ImageClassifier:
            head = text_head(text_features, backbone.logit_scale)
            if self.config.phase2.head_init == "random":
                torch.nn.init.normal_(head.weight, std=0.01)
            return ImageClassifier(copy.deepcopy(backbone.model.visual), head)

        def train(report):
            model = fresh_model()
            history = fine_tune(model, backbone, self.images, filtered["labels"][which - 1],
                                filtered["clean"][which - 1], self.config.phase2, self._seed(which) + 1,
                                self.config.num_workers, report)
            return {"state": model.state_dict(), "history": history}

        saved = self._stage(stage, train)
        self.metrics[f"phase2_model{which}_losses"] = saved["history"]
        model = fresh_model()
        model.load_state_dict(saved["state"])
        return model.eval().requires_grad_(False)

    def _finish(self, members, backbone: Backbone, zero_shot: dict, filtered: dict | None = None,
                prompt_models: list[PromptModel] | None = None) -> AdaptResult:
        report = self.tracker.reporter("finish")
        classifier = Classifier(members, self.class_names, backbone.model_cfg, backbone.preprocess_cfg)
        predictions = classifier.predict(self.images, self.config.eval_batch_size)
        report(0.5, "predicting")
        self.metrics.update(self._quality_signals(zero_shot, filtered, predictions))
        if self.evaluation is not None:
            self.metrics["accuracy"] = self._accuracies(classifier, zero_shot, prompt_models or [])
        classifier.metadata.update({
            "method": self.method,
            "backbone": {"model": self.backbone.model_id, "pretrained": self.backbone.pretrained},
            "phase2_backbone": {"model": backbone.model_id, "pretrained": backbone.pretrained},
            "config": self.config.to_dict(),
            "metrics": self.metrics,
        })
        report(1.0, "done")
        return AdaptResult(classifier, predictions, self.metrics, self._selections(zero_shot, filtered))

    @staticmethod
    def _selections(zero_shot: dict, filtered: dict | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        labels = zero_shot["probabilities"].argmax(dim=1)
        selections = {"zero_shot": (torch.arange(len(labels)), labels)}
        if "s_star_indices" in zero_shot:
            selections["s_star"] = (zero_shot["s_star_indices"], zero_shot["s_star_labels"])
        if filtered is not None:
            for i in (1, 2):
                kept = filtered["clean"][i - 1].nonzero(as_tuple=True)[0]
                selections[f"clean_model{i}"] = (kept, filtered["labels"][i - 1][kept])
        return selections

    # -- measurements --------------------------------------------------------------------------

    def _quality_signals(self, zero_shot: dict, filtered: dict | None, predictions: Predictions) -> dict[str, Any]:
        num_classes = len(self.class_names)
        zero_shot_counts = torch.bincount(zero_shot["probabilities"].argmax(dim=1), minlength=num_classes)
        final_counts = torch.bincount(predictions.indices, minlength=num_classes)
        probabilities = predictions.probabilities.clamp_min(1e-12)
        signals: dict[str, Any] = {
            "zero_shot_class_counts": dict(zip(self.class_names, zero_shot_counts.tolist())),
            "final_class_counts": dict(zip(self.class_names, final_counts.tolist())),
            "prediction_entropy": float(-(probabilities * probabilities.log()).sum(dim=1).mean()),
            "zero_shot_mean_confidence": float(zero_shot["probabilities"].max(dim=1).values.mean()),
            "final_mean_confidence": float(predictions.probabilities.max(dim=1).values.mean()),
        }
        if self.method != "zero-shot":
            s_star_counts = torch.bincount(zero_shot["s_star_labels"], minlength=num_classes)
            signals["s_star_size"] = int(len(zero_shot["s_star_indices"]))
            signals["s_star_class_counts"] = dict(zip(self.class_names, s_star_counts.tolist()))
        if filtered is not None:
            labels1, labels2 = filtered["labels"]
            signals["agreement"] = float((labels1 == labels2).float().mean())
            for i in (1, 2):
                signals[f"clean_fraction_model{i}"] = float(filtered["clean"][i - 1].float().mean())
                signals[f"mean_p_clean_model{i}"] = float(filtered["p_clean"][i - 1].mean())
        return signals

    def _accuracies(self, classifier: Classifier, zero_shot: dict, prompt_models: list[PromptModel]) -> dict[str, Any]:
        """True accuracy on the labelled holdout of zero-shot, each Phase I and II model, and the final."""
        images, truth = self.evaluation.images, self.evaluation.labels.cpu()
        batch_size = self.config.eval_batch_size
        eval_features = self._encode(self.backbone, None, images)
        zero_shot_predicted = (eval_features @ zero_shot["text_features"].to(eval_features.device).T).argmax(dim=1)
        accuracy = {"zero_shot": _accuracy(zero_shot_predicted, truth)}
        for i, model in enumerate(prompt_models, start=1):
            s_pos, _ = score_images(model, self.backbone, images, batch_size, self.config.num_workers)
            accuracy[f"phase1_model{i}"] = _accuracy(s_pos.argmax(dim=1), truth)
        if len(classifier.members) > 1:
            for i in range(len(classifier.members)):
                accuracy[f"phase2_model{i + 1}"] = _accuracy(classifier.member(i).predict(images, batch_size).indices,
                                                             truth)
        accuracy["final"] = _accuracy(classifier.predict(images, batch_size).indices, truth)
        return accuracy

    # -- helpers -------------------------------------------------------------------------------

    def _initial_text_features(self, backbone: Backbone | None = None) -> torch.Tensor:
        backbone = backbone or self.backbone
        settings = self.config.pseudo_labels
        templates = TEMPLATE_ENSEMBLE if settings.ensemble else [settings.template]
        return class_text_features(backbone, self.class_names, templates)

    def _encode(self, backbone: Backbone, report, images=None) -> torch.Tensor:
        images = self.images if images is None else images
        done = [0]

        def on_batch(n):
            done[0] += n
            if report is not None:
                report(done[0] / len(images), "encoding images")

        def encode(pixels):
            with backbone.autocast():
                return torch.nn.functional.normalize(backbone.model.encode_image(pixels).float(), dim=-1)

        return map_batches(encode, images, backbone.eval_transform(), self.config.eval_batch_size, backbone.device,
                           self.config.num_workers, on_batch).to(backbone.device)

    def _seed(self, which: int) -> int:
        return self.config.seed * 1000 + which * 10

    def _stage(self, name: str, compute):
        """Run a stage, or load its checkpoint when a previous attempt finished it."""
        if self.checkpoints is not None:
            saved = self.checkpoints.load(name)
            if saved is not None:
                self.tracker.emit(name, 1.0, "resumed from checkpoint")
                return saved
        self.tracker.emit(name, 0.0, "starting")
        # Random augmentations (torchvision) and a random head init draw from torch's global RNG: seed
        # it per stage, so a stage computes the same whether it runs after the others or on a resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 1000 + list(self.tracker.weights).index(name))
            result = compute(self.tracker.reporter(name))
        if self.checkpoints is not None:
            self.checkpoints.save(name, result)
        self.tracker.emit(name, 1.0, "done")
        return result

    def _stage_costs(self) -> dict[str, float]:
        """Expected cost of each stage, in image forward passes (a training step counts three)."""
        n = len(self.images)
        costs = {"zero-shot": float(n)}
        if self.method == "coft":
            s_star = min(n, len(self.class_names) * self.config.pseudo_labels.top_k)
            for i in (1, 2):
                costs[f"phase1-model{i}"] = 3.0 * self.config.phase1.epochs * s_star
            costs["filter"] = 2.0 * n
            for i in (1, 2):
                costs[f"phase2-model{i}"] = 3.0 * self.config.phase2.epochs * n * 0.7
        costs["finish"] = 2.0 * n
        return costs

    def _fingerprint(self) -> str:
        """Identifies the inputs, so a checkpoint directory is only resumed by the same run."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"method": self.method, "classes": self.class_names, "config": self.config.to_dict(),
                                  "backbone": [self.backbone.model_id, self.backbone.pretrained],
                                  "num_images": len(self.images)}, sort_keys=True).encode())
        for image in (self.images[0], self.images[len(self.images) - 1]):
            digest.update(image.tobytes()[:4096])
        return digest.hexdigest()


def _accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted.cpu() == truth).float().mean())


class _Checkpoints:
    """Stage results as files `<stage>.pt` in a directory, written atomically."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / "run.json"
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            for stale in self.directory.glob("*.pt"):
                stale.unlink()
        marker.write_text(json.dumps({"fingerprint": fingerprint}))

    def load(self, stage: str):
        path = self.directory / f"{stage}.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    def save(self, stage: str, value) -> None:
        path = self.directory / f"{stage}.pt"
        temporary = path.with_suffix(".pt.tmp")
        torch.save(value, temporary)
        os.replace(temporary, path)

    def completed(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.pt"))

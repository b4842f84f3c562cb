"""One function runs a whole adaptation: `adapt(images, class_names, method=...)`.

Stages, each checkpointed into `checkpoint_dir` when one is given, so an interrupted run resumes
where it stopped:
    decode     every image decoded once into a cache that every later pass reads (coft.image_cache)
    zero-shot  pseudo-labels for all of U, and S* (top-K per class)
    phase1     two prompt models, each trained on S*              (CoFT)
               CoFT+: R rounds per model, each a fresh model on the top-K of the previous round's
    filter     each model labels U, the other validates            (CoFT)
    phase2     two fresh vision towers + heads, fully fine-tuned   (CoFT)
               CoFT+: plus gamma * InfoNCE on all of U (coft.contrastive)
    finish     the classifier, its predictions on U, quality signals

CoFT+ also starts from class descriptions (coft.descriptions) instead of a single template.
Optional labelled shots (semi-supervised) join S* and every S_clean with their true labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from coft import convergence
from coft.backbone import PROXY_MODEL, Backbone, load_backbone
from coft.classifier import Classifier, ImageClassifier, Predictions, zero_shot_classifier
from coft.config import CoFTConfig
from coft.contrastive import MomentumContrast, queue_size
from coft.data import check_class_names
from coft.descriptions import LLMEndpoint, description_features, resolve_descriptions
from coft.image_cache import CachedImages, ImageSource, cached_images, image_fingerprint
from coft.losses import clean_probability
from coft.phase1 import PromptModel, score_images, train_prompt_model
from coft.phase2 import fine_tune, fresh_classifier
from coft.progress import ProgressCallback, ProgressTracker
from coft.prompts import TEMPLATE_ENSEMBLE, class_text_features
from coft.pseudo_labels import top_k_per_class, validated_by
from coft.training import in_order

METHODS = ("zero-shot", "coft", "coft+")
CHECKPOINT_FORMAT = 2  # what a stage checkpoint holds; checkpoints of another format are recomputed


@dataclass
class LabelledImages:
    """An optional labelled holdout: used only to report true accuracy, never to train."""

    images: Sequence[Image.Image] | ImageSource
    labels: torch.Tensor  # indices into the job's class names


@dataclass
class AdaptResult:
    classifier: Classifier
    predictions: Predictions  # the classifier's predictions on the adapted images themselves
    metrics: dict[str, Any] = field(default_factory=dict)
    # Which images the method trusted, with which labels: name -> (indices into the images, labels).
    # "zero_shot": all images; "s_star": the top-K per class; "clean_model{1,2}": each Phase II set.
    selections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def adapt(images: Sequence[Image.Image] | ImageSource, class_names: Sequence[str], *, method: str = "coft",
          backbone: Backbone | None = None, model: str = PROXY_MODEL, pretrained: str | None = None,
          config: CoFTConfig | None = None, progress: ProgressCallback | None = None,
          checkpoint_dir: str | os.PathLike | None = None, evaluation: LabelledImages | None = None,
          device: str | torch.device | None = None, descriptions: dict[str, list[str]] | None = None,
          llm: LLMEndpoint | None = None, labelled_shots: LabelledImages | None = None) -> AdaptResult:
    """Adapt a CLIP backbone to `class_names` using the unlabeled `images`.

    `images` are PIL images (a coft.data.ImageSet, say): the run decodes each once into a cache, kept
    in `checkpoint_dir` when there is one, else temporary. An ImageSource stands for already prepared
    inputs of the backbone's geometry (benchmarks/throughput.py uses this to time the model alone).
    `backbone` (already loaded) wins over `model`/`pretrained`. `progress` receives Progress events
    and may raise to stop the run. `evaluation` adds true accuracies to the metrics.
    `descriptions` ({class: [sentences]}) replace the template for the initial pseudo-labels, in any
    method; with method "coft+" and none given, `llm` is asked for them, else the template ensemble
    is used (metrics["prompt_source"] says which). `labelled_shots` (semi-supervised) are trained
    on with their true labels: they enter S* and both S_clean, exempt from the filter.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    class_names = check_class_names(class_names)
    if len(images) == 0:
        raise ValueError("no images to adapt on")
    config = config or CoFTConfig()
    backbone = backbone or load_backbone(model, pretrained, device)
    run = _Run(images, class_names, method, backbone, config, progress, checkpoint_dir, evaluation,
               descriptions, llm, labelled_shots)
    return run.execute()


class _Run:
    def __init__(self, images, class_names, method, backbone, config, progress, checkpoint_dir, evaluation,
                 descriptions=None, llm=None, labelled_shots=None):
        self.unlabeled = len(images)  # images[:unlabeled] are U; labelled shots, if any, follow
        self.shot_labels = torch.empty(0, dtype=torch.long)
        if labelled_shots is not None and len(labelled_shots.images):
            if method == "zero-shot":
                raise ValueError("labelled shots need a method that trains (coft, coft+)")
            if isinstance(images, ImageSource) or isinstance(labelled_shots.images, ImageSource):
                raise ValueError("labelled shots are joined to the images as PIL images, not ImageSources")
            images = _Concat(images, labelled_shots.images)
            self.shot_labels = labelled_shots.labels.cpu().long()
        self.images, self.class_names, self.method = images, class_names, method
        self.backbone, self.config, self.evaluation = backbone, config, evaluation
        self.descriptions, self.llm = descriptions, llm
        self.round_models: dict[int, list[PromptModel]] = {}
        self.round_selections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.images_fingerprint = images.fingerprint if isinstance(images, ImageSource) else image_fingerprint(images)
        self.checkpoints = _Checkpoints(checkpoint_dir, self._fingerprint()) if checkpoint_dir else None
        self.sources: dict[tuple, ImageSource] = {}
        self.tracker = ProgressTracker(progress, self._stage_costs())
        self.metrics: dict[str, Any] = {"method": method, "num_images": len(images), "num_classes": len(class_names)}
        self.tracker.metrics = self.metrics

    # -- the stages ----------------------------------------------------------------------------

    def execute(self) -> AdaptResult:
        self._stage("decode", self._decode, checkpointed=False)
        zero_shot = self._stage("zero-shot", self._zero_shot)
        if self.method == "zero-shot":
            members = list(zero_shot_classifier(self.backbone, self.class_names, zero_shot["text_features"]).members)
            return self._finish(members, self.backbone, zero_shot)
        prompt_models = [self._phase1_rounds(i, zero_shot) for i in (1, 2)]
        filtered = self._stage("filter", lambda report: self._filter(prompt_models, report))
        phase2_backbone = self._phase2_backbone()
        members = [self._phase2_model(i, filtered, phase2_backbone) for i in (1, 2)]
        return self._finish(members, phase2_backbone, zero_shot, filtered, prompt_models)

    def _decode(self, report) -> None:
        source = self._source("train", self.backbone, report)
        if isinstance(source, CachedImages):
            self.metrics["image_cache"] = source.cache.stats.as_metrics()

    def _zero_shot(self, report) -> dict[str, Any]:
        text_features, source = self._pseudo_label_text_features()
        image_features = self._encode(self.backbone, self._source("train", self.backbone), report)
        probabilities = (self.backbone.logit_scale * image_features @ text_features.T).softmax(dim=1).cpu()
        indices, labels = self._top_k_with_shots(probabilities)
        # Stage results live on the CPU, as they do when loaded from a checkpoint; per image, only the
        # label and its probability are kept: [N, C] probabilities would cost 400 MB at 100k x 1,000.
        confidence, predicted = probabilities.max(dim=1)
        return {"text_features": text_features.cpu(), "labels": predicted, "confidence": confidence,
                "s_star_indices": indices, "s_star_labels": labels, **source}

    def _pseudo_label_text_features(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """Class embeddings for the initial pseudo-labels, and where their prompts came from."""
        if self.descriptions is None and self.method != "coft+":
            source = "template-ensemble" if self.config.pseudo_labels.ensemble else "template"
            return self._initial_text_features(), {"prompt_source": source}
        resolved = resolve_descriptions(self.class_names, self.descriptions, self.llm,
                                        self.config.coft_plus.llm_descriptions_per_class)
        info = {"prompt_source": resolved.source}
        if resolved.fallback_reason is not None:
            info["prompt_fallback_reason"] = resolved.fallback_reason
        return description_features(self.backbone, resolved, self.class_names), info

    def _top_k(self, round_: int) -> int:
        """Images per class in round r's S*: K, or r*K when CoFT+'s rounds grow it."""
        return self.config.pseudo_labels.top_k * (round_ if self.config.coft_plus.round_top_k == "grow" else 1)

    def _top_k_with_shots(self, probabilities: torch.Tensor, round_: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """S*: top-K per class among the unlabeled images, plus every labelled shot with its true label."""
        indices, labels = top_k_per_class(probabilities[:self.unlabeled], self._top_k(round_))
        shots = torch.arange(self.unlabeled, self.unlabeled + len(self.shot_labels))
        return torch.cat([indices, shots]), torch.cat([labels, self.shot_labels])

    def _phase1_rounds(self, which: int, zero_shot: dict) -> PromptModel:
        """CoFT: one Phase I model. CoFT+: R rounds; round r trains a FRESH model (the frozen CLIP,
        new prompts) on the top-K (or r*K, `coft_plus.round_top_k`) per class of round r-1's model.
        Only data carries over."""
        model = self._phase1_model(which, zero_shot)
        self.round_models[which] = [model]
        rounds = self.config.coft_plus.rounds if self.method == "coft+" else 1
        for round_ in range(2, rounds + 1):
            model = self._phase1_round(which, round_, model)
            self.round_models[which].append(model)
        return model

    def _phase1_round(self, which: int, round_: int, previous: PromptModel) -> PromptModel:
        stage = f"phase1-model{which}-round{round_}"
        seed = self._seed(which) + 100 * (round_ - 1)

        def train(report):
            images = self._source("train", self.backbone)
            s_pos, _ = score_images(previous, self.backbone, images, self.config.eval_batch_size,
                                    lambda f, m: report(0.1 * f, m))
            # The spec's confidence: the softmax of the positive prompts.
            indices, labels = self._top_k_with_shots((s_pos * previous.scale).softmax(dim=1), round_)
            model, history = train_prompt_model(
                self.backbone, self.class_names, images, indices, labels, self.config.phase1, seed,
                lambda f, m: report(0.1 + 0.85 * f, m))
            return {"state": model.state_dict(), "history": history, "indices": indices, "labels": labels,
                    "predicted": self._phase1_labels(model, images, indices)}

        saved = self._stage(stage, train)
        self._record_fit(convergence.fit(stage, saved["predicted"], saved["labels"], saved["history"]))
        self.metrics[f"phase1_model{which}_round{round_}_losses"] = saved["history"]
        self.metrics[f"s_star_model{which}_round{round_}_size"] = int(len(saved["indices"]))
        self.round_selections[f"s_star_model{which}_round{round_}"] = (saved["indices"], saved["labels"])
        model = PromptModel(self.backbone, self.class_names, self.config.phase1, seed)
        model.load_state_dict(saved["state"])
        return model.eval()

    def _phase1_model(self, which: int, zero_shot: dict) -> PromptModel:
        stage = f"phase1-model{which}"

        indices, labels = zero_shot["s_star_indices"], zero_shot["s_star_labels"]

        def train(report):
            images = self._source("train", self.backbone)
            model, history = train_prompt_model(self.backbone, self.class_names, images, indices, labels,
                                                self.config.phase1, self._seed(which), lambda f, m: report(0.95 * f, m))
            return {"state": model.state_dict(), "history": history,
                    "predicted": self._phase1_labels(model, images, indices)}

        saved = self._stage(stage, train)
        self._record_fit(convergence.fit(stage, saved["predicted"], labels, saved["history"]))
        self.metrics[f"phase1_model{which}_losses"] = saved["history"]
        model = PromptModel(self.backbone, self.class_names, self.config.phase1, self._seed(which))
        model.load_state_dict(saved["state"])
        return model.eval()

    def _phase1_labels(self, model: PromptModel, images: ImageSource, indices: torch.Tensor) -> torch.Tensor:
        """The model's labels for its own training set (test-time views): what convergence.fit compares."""
        s_pos, _ = score_images(model, self.backbone, images, self.config.eval_batch_size, indices=indices)
        return s_pos.argmax(dim=1)

    def _record_fit(self, fit: convergence.Fit) -> None:
        self.metrics.setdefault("fit", {})[fit.stage] = fit.as_metrics()
        warning = fit.warning()
        if warning is not None:
            self.metrics.setdefault("warnings", []).append(warning)

    def _filter(self, prompt_models: list[PromptModel], report) -> dict[str, Any]:
        images = self._source("train", self.backbone)
        scores = []
        for i, model in enumerate(prompt_models):
            scores.append(score_images(model, self.backbone, images, self.config.eval_batch_size,
                                       lambda f, m, i=i: report((i + f) / 2, m)))
        (pos1, neg1), (pos2, neg2) = scores
        labels1, labels2 = pos1.argmax(dim=1), pos2.argmax(dim=1)
        scale = self.backbone.logit_scale
        rows = torch.arange(len(labels1))
        # Model 2 validates model 1's labels, and model 1 validates model 2's.
        clean1, clean2 = validated_by(labels1, pos2, neg2), validated_by(labels2, pos1, neg1)
        shots = slice(self.unlabeled, None)  # labelled shots: their true label, exempt from the filter
        for labels, clean in ((labels1, clean1), (labels2, clean2)):
            labels[shots] = self.shot_labels
            clean[shots] = True
        return {
            "labels": [labels1, labels2],
            "clean": [clean1, clean2],
            "p_clean": [clean_probability(pos2[rows, labels1], neg2[rows, labels1], scale),
                        clean_probability(pos1[rows, labels2], neg1[rows, labels2], scale)],
            # Each labelling model's own confidence in its label (the positive prompts' softmax at
            # CLIP's temperature): the baseline a filter must beat.
            "confidence": [(pos1 * scale).softmax(dim=1).max(dim=1).values,
                           (pos2 * scale).softmax(dim=1).max(dim=1).values],
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
            return fresh_classifier(backbone, text_features, self.config.phase2)

        def train(report):
            model = fresh_model()
            history = fine_tune(model, backbone, self._source("train", backbone), filtered["labels"][which - 1],
                                filtered["clean"][which - 1], self.config.phase2, self._seed(which) + 1, report,
                                contrastive=self._contrastive(model, backbone))
            return {"state": model.state_dict(), "history": history}

        saved = self._stage(stage, train)
        self.metrics[f"phase2_model{which}_losses"] = saved["history"]
        model = fresh_model()
        model.load_state_dict(saved["state"])
        return model.eval().requires_grad_(False)

    def _contrastive(self, model: ImageClassifier, backbone: Backbone) -> MomentumContrast | None:
        """CoFT+'s momentum contrastive term for Phase II, or None (CoFT, or turned off)."""
        plus = self.config.coft_plus
        if self.method != "coft+" or not plus.contrastive:
            return None
        batch = self.config.phase2.batch_size
        length = plus.queue_size or queue_size(len(self.images), batch, plus.queue_max)
        return MomentumContrast(model.visual, backbone.model_cfg["embed_dim"], backbone.preprocess_cfg,
                                backbone.device, momentum=plus.momentum, temperature=plus.temperature,
                                weight=plus.contrastive_weight, queue_length=length, hflip=self.config.phase2.hflip,
                                shared_view=plus.shared_view)

    def _finish(self, members, backbone: Backbone, zero_shot: dict, filtered: dict | None = None,
                prompt_models: list[PromptModel] | None = None) -> AdaptResult:
        self.tracker.emit("finish", 0.0, "starting")
        report = self.tracker.reporter("finish")
        classifier = Classifier(members, self.class_names, backbone.model_cfg, backbone.preprocess_cfg)
        images = self._source("train", backbone)
        # Member by member (the ensemble is their mean): each Phase II model's fit needs its own labels.
        by_member = [classifier.member(i).predict(images, self.config.eval_batch_size).probabilities
                     for i in range(len(members))]
        predictions = Predictions(self.class_names, torch.stack(by_member).mean(dim=0)[:self.unlabeled])
        if filtered is not None:
            for i, probabilities in enumerate(by_member, start=1):
                clean = filtered["clean"][i - 1].bool()
                self._record_fit(convergence.fit(f"phase2-model{i}", probabilities.argmax(dim=1)[clean],
                                                 filtered["labels"][i - 1][clean],
                                                 self.metrics[f"phase2_model{i}_losses"]))
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
        return AdaptResult(classifier, predictions, self.metrics,
                           {**self._selections(zero_shot, filtered), **self.round_selections})

    def _selections(self, zero_shot: dict, filtered: dict | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        labels = zero_shot["labels"][:self.unlabeled]
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
        zero_shot_counts = torch.bincount(zero_shot["labels"][:self.unlabeled], minlength=num_classes)
        final_counts = torch.bincount(predictions.indices, minlength=num_classes)
        probabilities = predictions.probabilities.clamp_min(1e-12)
        signals: dict[str, Any] = {
            "zero_shot_class_counts": dict(zip(self.class_names, zero_shot_counts.tolist())),
            "final_class_counts": dict(zip(self.class_names, final_counts.tolist())),
            "prediction_entropy": float(-(probabilities * probabilities.log()).sum(dim=1).mean()),
            "zero_shot_mean_confidence": float(zero_shot["confidence"][:self.unlabeled].mean()),
            "final_mean_confidence": float(predictions.probabilities.max(dim=1).values.mean()),
            "prompt_source": zero_shot.get("prompt_source", "template"),
        }
        if "prompt_fallback_reason" in zero_shot:
            signals["prompt_fallback_reason"] = zero_shot["prompt_fallback_reason"]
        if self.shot_labels.numel():
            signals["labelled_shots"] = int(self.shot_labels.numel())
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
        truth = self.evaluation.labels.cpu()
        batch_size = self.config.eval_batch_size
        images = self._source("eval", self.backbone)
        eval_features = self._encode(self.backbone, images)
        zero_shot_predicted = (eval_features @ zero_shot["text_features"].to(eval_features.device).T).argmax(dim=1)
        accuracy = {"zero_shot": _accuracy(zero_shot_predicted, truth)}
        for i, model in enumerate(prompt_models, start=1):
            s_pos, _ = score_images(model, self.backbone, images, batch_size)
            accuracy[f"phase1_model{i}"] = _accuracy(s_pos.argmax(dim=1), truth)
            for round_, earlier in enumerate(self.round_models.get(i, [])[:-1], start=1):  # CoFT+'s earlier rounds
                s_pos, _ = score_images(earlier, self.backbone, images, batch_size)
                accuracy[f"phase1_model{i}_round{round_}"] = _accuracy(s_pos.argmax(dim=1), truth)
        phase2_images = self._source("eval", self._phase2_backbone_of(classifier))
        if len(classifier.members) > 1:
            for i in range(len(classifier.members)):
                accuracy[f"phase2_model{i + 1}"] = _accuracy(
                    classifier.member(i).predict(phase2_images, batch_size).indices, truth)
        accuracy["final"] = _accuracy(classifier.predict(phase2_images, batch_size).indices, truth)
        return accuracy

    # -- helpers -------------------------------------------------------------------------------

    def _initial_text_features(self, backbone: Backbone | None = None) -> torch.Tensor:
        backbone = backbone or self.backbone
        settings = self.config.pseudo_labels
        templates = TEMPLATE_ENSEMBLE if settings.ensemble else [settings.template]
        return class_text_features(backbone, self.class_names, templates)

    def _source(self, which: str, backbone: Backbone, report=None) -> ImageSource:
        """The images (`which` "train": U, then any labelled shots; "eval": the holdout) as `backbone`
        sees them, decoded once per geometry."""
        given = self.images if which == "train" else self.evaluation.images
        if isinstance(given, ImageSource):
            if backbone.preprocess_cfg != self.backbone.preprocess_cfg:
                raise ValueError("an ImageSource serves one geometry; a Phase II backbone with other "
                                 "preprocessing needs PIL images")
            return given
        key = (which, json.dumps(backbone.preprocess_cfg, sort_keys=True), str(backbone.device))
        if key not in self.sources:
            directory = self.checkpoints.directory / "images" if self.checkpoints is not None else None
            trains = which == "train" and self.method != "zero-shot"  # else test-time rows are all it needs
            self.sources[key] = cached_images(
                given, backbone.preprocess_cfg, backbone.device, directory=directory,
                train_scale=self.config.cache_scale if trains else None, threads=self.config.decode_threads,
                report=report, fingerprint=self.images_fingerprint if which == "train" else None)
        return self.sources[key]

    def _phase2_backbone_of(self, classifier: Classifier) -> Backbone:
        """The backbone whose geometry the classifier's members read (the Phase II one)."""
        if classifier.preprocess_cfg == self.backbone.preprocess_cfg:
            return self.backbone
        return self._phase2_backbone()

    def _encode(self, backbone: Backbone, images: ImageSource, report=None) -> torch.Tensor:
        """[N, D] unit-norm embeddings of the frozen backbone, test-time view, on its device."""
        features = []
        with torch.no_grad():
            for positions in in_order(len(images), self.config.eval_batch_size):
                with backbone.autocast():
                    embedded = backbone.model.encode_image(images.test_view(positions))
                features.append(torch.nn.functional.normalize(embedded.float(), dim=-1))
                if report is not None:
                    report(int(positions[-1] + 1) / len(images), "encoding images")
        return torch.cat(features)

    def _seed(self, which: int) -> int:
        return self.config.seed * 1000 + which * 10

    def _stage(self, name: str, compute, checkpointed: bool = True):
        """Run a stage, or load its checkpoint when a previous attempt finished it."""
        if self.checkpoints is not None and checkpointed:
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
        if self.checkpoints is not None and checkpointed:
            self.checkpoints.save(name, result)
        self.tracker.emit(name, 1.0, "done")
        return result

    def _stage_costs(self) -> dict[str, float]:
        """Expected cost of each stage, in image forward passes (a training step counts three)."""
        n = len(self.images)
        costs = {"decode": 0.5 * n, "zero-shot": float(n)}
        if self.method in ("coft", "coft+"):
            plus = self.method == "coft+"
            s_star = min(n, len(self.class_names) * self.config.pseudo_labels.top_k) + len(self.shot_labels)
            for i in (1, 2):
                costs[f"phase1-model{i}"] = 3.0 * self.config.phase1.epochs * s_star
                for round_ in range(2, (self.config.coft_plus.rounds if plus else 1) + 1):
                    round_s_star = min(n, len(self.class_names) * self._top_k(round_))
                    costs[f"phase1-model{i}-round{round_}"] = n + 3.0 * self.config.phase1.epochs * (
                        round_s_star + len(self.shot_labels))
            costs["filter"] = 2.0 * n
            # CE on the clean ~70%; the contrastive term adds a key pass without gradient on all of U and a
            # query pass with gradient, or, when the two share a view, turns the CE pass into one on all.
            per_image = 3.0 * 0.7
            if plus and self.config.coft_plus.contrastive:
                per_image = 3.0 + 1.0 if self.config.coft_plus.shared_view != "none" else per_image + 3.0 + 1.0
            for i in (1, 2):
                costs[f"phase2-model{i}"] = per_image * self.config.phase2.epochs * n
        costs["finish"] = 2.0 * n
        return costs

    def _fingerprint(self) -> str:
        """Identifies the inputs, so a checkpoint directory is only resumed by the same run."""
        return hashlib.sha256(json.dumps({
            "format": CHECKPOINT_FORMAT, "method": self.method, "classes": self.class_names,
            "config": self.config.to_dict(), "backbone": [self.backbone.model_id, self.backbone.pretrained],
            "images": self.images_fingerprint, "descriptions": self.descriptions,
            "shot_labels": self.shot_labels.tolist()}, sort_keys=True).encode()).hexdigest()


def _accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted.cpu() == truth).float().mean())


class _Checkpoints:
    """Stage results as files `<stage>.pt` in a directory, written atomically; the decoded-image
    caches of the run in its `images/` folder. Another run's files are removed on arrival."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / "run.json"
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            for stale in self.directory.glob("*.pt"):
                stale.unlink()
            shutil.rmtree(self.directory / "images", ignore_errors=True)
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


class _Concat(Sequence):
    """Unlabeled images followed by labelled shots, without copying either."""

    def __init__(self, first: Sequence[Image.Image], second: Sequence[Image.Image]):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.decode(index)

    def decode(self, index: int, at_least: tuple[int, int] | None = None) -> Image.Image:
        """Image `index`, decoded at a reduced scale where the part allows it (coft.data.ImageSet)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part, offset = (self.first, index) if index < len(self.first) else (self.second, index - len(self.first))
        decode = getattr(part, "decode", None)
        return decode(offset, at_least) if decode is not None else part[offset]

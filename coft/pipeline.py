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

`_adapt` is the outline; the stages themselves are coft.stages, their order and costs
coft.schedule, their seeds coft.seeding, their checkpoints coft.checkpoints, running one of them
coft.stage_runner, the run's images coft.run_images, and what the run reports coft.quality and
coft.convergence. `prepare` wires those units for one run (an `Adaptation`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from coft import convergence, seeding, stages
from coft.augment import train_augmentation
from coft.backbone import PROXY_MODEL, Backbone, load_backbone
from coft.checkpoints import Checkpoints, run_fingerprint
from coft.classifier import Classifier, ImageClassifier, Predictions, zero_shot_classifier
from coft.config import CoFTConfig
from coft.data import check_class_names
from coft.descriptions import LLMEndpoint, initial_class_features
from coft.image_cache import CachedImages, ImageSource
from coft.phase1 import PromptModel
from coft.phase2 import check_options as check_phase2_options, fresh_classifier
from coft.progress import ProgressCallback, ProgressTracker
from coft.prompts import template_features
from coft.quality import holdout_accuracies, quality_signals
from coft.run_images import LabelledImages, RunImages
from coft.schedule import round_top_k, rounds, s_star_weight, stage_costs
from coft.stage_runner import StageRunner
from coft.stages import Filtered, FineTuned, TrainedPrompts, ZeroShot

METHODS = ("zero-shot", "coft", "coft+")


@dataclass
class AdaptResult:
    classifier: Classifier
    predictions: Predictions  # the classifier's predictions on the adapted images themselves
    metrics: dict[str, Any] = field(default_factory=dict)
    # Which images the method trusted, with which labels: name -> (indices into the images, labels).
    # "zero_shot": all images; "s_star": the top-K per class; "filter_model{1,2}": every image with
    # the label each Phase I model gave it; "clean_model{1,2}": each Phase II set (what the other kept).
    selections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def review(self) -> list[dict[str, Any]]:
        """Per adapted image, in order, what the method did with it (a dashboard's gallery):
        `zero_shot_label`, `s_star` (in the Phase I training set), `model_labels` (each Phase I model's
        label; empty for zero-shot), `clean` (whether that label entered its Phase II set)."""
        names = self.predictions.class_names
        count = len(self.predictions.probabilities)

        def labels_of(name: str) -> list[str | None]:
            column: list[str | None] = [None] * count
            if name in self.selections:
                for index, label in zip(*(t.tolist() for t in self.selections[name])):
                    if index < count:  # labelled shots follow the images: not part of the review
                        column[index] = names[label]
            return column

        zero_shot, s_star = labels_of("zero_shot"), labels_of("s_star")
        models = [labels_of(f"filter_model{i}") for i in (1, 2) if f"filter_model{i}" in self.selections]
        clean = [labels_of(f"clean_model{i}") for i in (1, 2) if f"clean_model{i}" in self.selections]
        return [{"zero_shot_label": zero_shot[i], "s_star": s_star[i] is not None,
                 "model_labels": [column[i] for column in models],
                 "clean": [column[i] is not None for column in clean]} for i in range(count)]


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
    config = config or CoFTConfig()
    check_job(method, config)
    class_names = check_class_names(class_names)
    if len(images) == 0:
        raise ValueError("no images to adapt on")
    backbone = backbone or load_backbone(model, pretrained, device)
    run = prepare(images, class_names, method, backbone, config, progress=progress, checkpoint_dir=checkpoint_dir,
                  evaluation=evaluation, descriptions=descriptions, llm=llm, labelled_shots=labelled_shots)
    return _adapt(run)


def check_job(method: str, config: CoFTConfig) -> None:
    """Refuse a method, or a config the method cannot honour, before any work: adapt() asks first, and
    the service asks when a job is submitted (a 4xx then, not a job that fails in the worker)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_phase2_options(config.phase2, contrastive=_contrastive(method, config))


@dataclass
class Adaptation:
    """One run's inputs and the units it runs with: its images, its stage runner (checkpoints,
    seeding, progress) and what it reports (metrics, and which images it trusted)."""

    class_names: list[str]
    method: str
    backbone: Backbone
    config: CoFTConfig
    images: RunImages
    stages: StageRunner
    descriptions: dict[str, list[str]] | None = None
    llm: LLMEndpoint | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    selections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # CoFT+'s rounds' S*

    def source(self, which: str, backbone: Backbone | None = None) -> ImageSource:
        """The run's images (`which` "train" or "eval") as `backbone` (default: the run's) sees them."""
        return self.images.source(which, backbone or self.backbone, geometry_of=self.backbone)


def prepare(images: Sequence[Image.Image] | ImageSource, class_names: list[str], method: str, backbone: Backbone,
            config: CoFTConfig, *, progress: ProgressCallback | None = None,
            checkpoint_dir: str | os.PathLike | None = None, evaluation: LabelledImages | None = None,
            descriptions: dict[str, list[str]] | None = None, llm: LLMEndpoint | None = None,
            labelled_shots: LabelledImages | None = None) -> Adaptation:
    """The units of one run, wired: its images (U, then any shots), checkpoints keyed by everything
    the result depends on, progress weighted by each stage's cost, and the stage runner."""
    run_images = RunImages(images, labelled_shots=labelled_shots, evaluation=evaluation,
                           trains=method != "zero-shot", cache_scale=config.cache_scale, threads=config.decode_threads)
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = Checkpoints(checkpoint_dir, run_fingerprint(
            method=method, classes=class_names, config=config.to_dict(),
            backbone=[backbone.model_id, backbone.pretrained], images=run_images.fingerprint,
            descriptions=descriptions, shot_labels=run_images.shot_labels.tolist()))
        run_images.cache_dir = checkpoints.images
    tracker = ProgressTracker(progress, stage_costs(method, config, len(run_images), len(class_names),
                                                    len(run_images.shot_labels)))
    metrics: dict[str, Any] = {"method": method, "num_images": len(run_images), "num_classes": len(class_names)}
    tracker.metrics = metrics
    return Adaptation(class_names, method, backbone, config, run_images, StageRunner(tracker, config.seed, checkpoints),
                      descriptions, llm, metrics)


def _adapt(run: Adaptation) -> AdaptResult:
    """The method, stage by stage (each checkpointed; on a resume, loaded instead of run)."""
    run.stages.run("decode", lambda report: _decode(run, report))
    images, shots, unlabeled = run.source("train"), run.images.shot_labels, run.images.unlabeled
    zero_shot = run.stages.run("zero-shot", lambda report: stages.zero_shot(
        run.backbone, images, *initial_class_features(run.backbone, run.class_names, run.method, run.config,
                                                      run.descriptions, run.llm),
        round_top_k(run.config, 1, unlabeled, len(run.class_names)), unlabeled, shots, run.config.eval_batch_size,
        report, run.config.pseudo_labels.views,
        train_augmentation(run.backbone.preprocess_cfg, run.config.phase1.crop_scale_min, run.config.phase1.hflip)),
        ZeroShot)
    if run.method == "zero-shot":
        members = zero_shot_classifier(run.backbone, run.class_names, zero_shot.text_features).members
        return _finish(run, list(members), run.backbone, zero_shot)
    prompt_models = {i: _phase1_rounds(run, i, zero_shot) for i in (1, 2)}  # model index -> its rounds
    filtered = run.stages.run("filter", lambda report: stages.collaborative_filter(
        [prompt_models[1][-1], prompt_models[2][-1]], run.backbone, images, unlabeled, shots,
        run.config.eval_batch_size, report), Filtered)
    backbone = _phase2_backbone(run)
    members = [_phase2_member(run, i, filtered, backbone, zero_shot.s_star_indices) for i in (1, 2)]
    return _finish(run, members, backbone, zero_shot, filtered, prompt_models)


def _decode(run: Adaptation, report) -> None:
    source = run.images.source("train", run.backbone, report)
    if isinstance(source, CachedImages):
        run.metrics["image_cache"] = source.cache.stats.as_metrics()


def _phase1_rounds(run: Adaptation, model_index: int, zero_shot: ZeroShot) -> list[PromptModel]:
    """CoFT: one Phase I model on S*. CoFT+: R rounds, round r a FRESH model (the frozen CLIP, new
    prompts) on the top-K (or r*K, `coft_plus.round_top_k`) per class of round r-1's model. Only
    data carries over."""
    models: list[PromptModel] = []
    images, config = run.source("train"), run.config
    for round_ in range(1, rounds(config, run.method) + 1):
        stage = f"phase1-model{model_index}" + (f"-round{round_}" if round_ > 1 else "")
        seed = seeding.round_seed(config.seed, model_index, round_)

        def train(report, round_: int = round_, seed: int = seed) -> TrainedPrompts:
            if round_ == 1:
                indices, labels = zero_shot.s_star_indices, zero_shot.s_star_labels
                return stages.phase1(run.backbone, run.class_names, images, indices, labels, config, seed, report)
            top_k = round_top_k(config, round_, run.images.unlabeled, len(run.class_names))
            indices, labels = stages.next_round_set(
                models[-1], run.backbone, images, top_k, run.images.unlabeled, run.images.shot_labels,
                config.eval_batch_size, lambda f, m: report(0.1 * f, m))
            return stages.phase1(run.backbone, run.class_names, images, indices, labels, config, seed,
                                 lambda f, m: report(0.1 + 0.9 * f, m))

        trained = run.stages.run(stage, train, TrainedPrompts)
        convergence.record(run.metrics, convergence.fit(stage, trained.predicted, trained.labels, trained.history))
        prefix = f"phase1_model{model_index}" + (f"_round{round_}" if round_ > 1 else "")
        run.metrics[f"{prefix}_losses"] = trained.history
        if round_ > 1:
            run.metrics[f"s_star_model{model_index}_round{round_}_size"] = int(len(trained.indices))
            run.selections[f"s_star_model{model_index}_round{round_}"] = (trained.indices, trained.labels)
        model = PromptModel(run.backbone, run.class_names, config.phase1, seed)
        model.load_state_dict(trained.state)
        models.append(model.eval())
    prompts = models[0].prompts
    if prompts.context_tokens != prompts.requested_context_tokens:  # the class names left less room
        run.metrics["phase1_context_tokens"] = {"requested": prompts.requested_context_tokens,
                                                "used": prompts.context_tokens}
    return models


def _phase2_backbone(run: Adaptation) -> Backbone:
    phase2 = run.config.phase2
    if phase2.backbone is None:
        return run.backbone
    return load_backbone(phase2.backbone, phase2.backbone_pretrained, run.backbone.device)


def _contrastive(method: str, config: CoFTConfig) -> bool:
    """Whether Phase II adds CoFT+'s contrastive term."""
    return method == "coft+" and config.coft_plus.contrastive


def _phase2_member(run: Adaptation, model_index: int, filtered: Filtered, backbone: Backbone,
                   s_star: torch.Tensor) -> ImageClassifier:
    text_features = template_features(backbone, run.class_names, run.config.pseudo_labels)
    contrastive = _contrastive(run.method, run.config)
    tuned = run.stages.run(f"phase2-model{model_index}", lambda report: stages.phase2(
        backbone, run.source("train", backbone), text_features, filtered, model_index, run.config,
        seeding.phase2_seed(run.config.seed, model_index), contrastive, report, s_star,
        s_star_weight(run.config, run.method)), FineTuned)
    run.metrics[f"phase2_model{model_index}_losses"] = tuned.history
    member = fresh_classifier(backbone, text_features, run.config.phase2)
    member.load_state_dict(tuned.state)
    return member.eval().requires_grad_(False)


def _finish(run: Adaptation, members: list[ImageClassifier], backbone: Backbone, zero_shot: ZeroShot,
            filtered: Filtered | None = None, prompt_models: dict[int, list[PromptModel]] | None = None) -> AdaptResult:
    """The classifier, its predictions on U, each Phase II model's fit, the quality signals, and the
    holdout's accuracies when there is one."""
    tracker, unlabeled, config = run.stages.tracker, run.images.unlabeled, run.config
    tracker.emit("finish", 0.0, "starting")
    report = tracker.reporter("finish")
    classifier = Classifier(members, run.class_names, backbone.model_cfg, backbone.preprocess_cfg)
    images = run.source("train", backbone)
    # Member by member (the ensemble is their mean): each Phase II model's fit needs its own labels.
    by_member = [classifier.member(i).predict(images, config.eval_batch_size).probabilities
                 for i in range(len(members))]
    predictions = Predictions(run.class_names, torch.stack(by_member).mean(dim=0)[:unlabeled])
    if filtered is not None:
        for i, probabilities in enumerate(by_member, start=1):
            clean = filtered.clean[i - 1].bool()
            convergence.record(run.metrics, convergence.fit(
                f"phase2-model{i}", probabilities.argmax(dim=1)[clean], filtered.labels[i - 1][clean],
                run.metrics[f"phase2_model{i}_losses"]))
    report(0.5, "predicting")
    run.metrics.update(quality_signals(run.class_names, unlabeled, zero_shot, predictions, filtered,
                                       trained=run.method != "zero-shot", shots=int(run.images.shot_labels.numel())))
    if run.images.evaluation is not None:
        run.metrics["accuracy"] = holdout_accuracies(
            run.images.evaluation.labels.cpu(), run.backbone, run.source("eval"), zero_shot, prompt_models or {},
            classifier, run.source("eval", backbone), config.eval_batch_size)
    classifier.metadata.update({
        "method": run.method,
        "backbone": {"model": run.backbone.model_id, "pretrained": run.backbone.pretrained},
        "phase2_backbone": {"model": backbone.model_id, "pretrained": backbone.pretrained},
        "config": config.to_dict(),
        "metrics": run.metrics,
    })
    report(1.0, "done")
    labels = zero_shot.labels[:unlabeled]
    selections = {"zero_shot": (torch.arange(len(labels)), labels),
                  "s_star": (zero_shot.s_star_indices, zero_shot.s_star_labels)}
    if filtered is not None:
        for i in (1, 2):
            selections[f"filter_model{i}"] = (torch.arange(len(filtered.labels[i - 1])), filtered.labels[i - 1])
            selections[f"clean_model{i}"] = filtered.clean_set(i)
    return AdaptResult(classifier, predictions, run.metrics, {**selections, **run.selections})

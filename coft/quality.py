"""What a run measures about itself: the label-free quality signals every job reports (the method
spec's list), and, given a labelled holdout, the true accuracy of every model along the way."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from coft.backbone import Backbone
from coft.classifier import Classifier, Predictions
from coft.image_cache import ImageSource
from coft.phase1 import PromptModel, score_images
from coft.stages import Filtered, ZeroShot, encode


def quality_signals(class_names: Sequence[str], unlabeled: int, zero_shot: ZeroShot, predictions: Predictions,
                    filtered: Filtered | None = None, trained: bool = True, shots: int = 0) -> dict[str, Any]:
    """Class balance from zero-shot to the final model, confidence and entropy, S*'s size and classes,
    the two models' agreement, each clean set's fraction of U and mean p_clean."""
    num_classes = len(class_names)
    zero_shot_counts = torch.bincount(zero_shot.labels[:unlabeled], minlength=num_classes)
    final_counts = torch.bincount(predictions.indices, minlength=num_classes)
    probabilities = predictions.probabilities.clamp_min(1e-12)
    signals: dict[str, Any] = {
        "zero_shot_class_counts": dict(zip(class_names, zero_shot_counts.tolist())),
        "final_class_counts": dict(zip(class_names, final_counts.tolist())),
        "prediction_entropy": float(-(probabilities * probabilities.log()).sum(dim=1).mean()),
        "zero_shot_mean_confidence": float(zero_shot.confidence[:unlabeled].mean()),
        "final_mean_confidence": float(predictions.probabilities.max(dim=1).values.mean()),
        "prompt_source": zero_shot.prompt_source,
    }
    if zero_shot.prompt_fallback_reason is not None:
        signals["prompt_fallback_reason"] = zero_shot.prompt_fallback_reason
    if shots:
        signals["labelled_shots"] = shots
    if trained:
        s_star_counts = torch.bincount(zero_shot.s_star_labels, minlength=num_classes)
        signals["s_star_size"] = int(len(zero_shot.s_star_indices))
        signals["s_star_class_counts"] = dict(zip(class_names, s_star_counts.tolist()))
    if filtered is not None:
        labels1, labels2 = filtered.labels
        signals["agreement"] = float((labels1 == labels2).float().mean())
        for i in (1, 2):
            signals[f"clean_fraction_model{i}"] = float(filtered.clean[i - 1].float().mean())
            signals[f"mean_p_clean_model{i}"] = float(filtered.p_clean[i - 1].mean())
    return signals


def accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted.cpu() == truth.cpu()).float().mean())


def holdout_accuracies(truth: torch.Tensor, backbone: Backbone, images: ImageSource, zero_shot: ZeroShot,
                       rounds: dict[int, list[PromptModel]], classifier: Classifier, classifier_images: ImageSource,
                       batch_size: int) -> dict[str, float]:
    """True accuracy on a labelled holdout of zero-shot, every Phase I model (each CoFT+ round), every
    Phase II member and the final classifier. `rounds`: model index -> its rounds' models, in order;
    `classifier_images`: the holdout as the classifier's (Phase II) backbone sees it."""
    features = encode(backbone, images, batch_size)
    scores = {"zero_shot": accuracy((features @ zero_shot.text_features.to(features.device).T).argmax(dim=1), truth)}
    for i, models in rounds.items():  # the last round's model first: the one Phase II learned from
        for round_, model in [(len(models), models[-1]), *enumerate(models[:-1], start=1)]:
            s_pos, _ = score_images(model, backbone, images, batch_size)
            name = f"phase1_model{i}" if round_ == len(models) else f"phase1_model{i}_round{round_}"
            scores[name] = accuracy(s_pos.argmax(dim=1), truth)
    if len(classifier.members) > 1:
        for i in range(len(classifier.members)):
            scores[f"phase2_model{i + 1}"] = accuracy(classifier.member(i).predict(classifier_images, batch_size).indices,
                                                      truth)
    scores["final"] = accuracy(classifier.predict(classifier_images, batch_size).indices, truth)
    return scores

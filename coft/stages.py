"""The stages of a run, each a function of explicit inputs that returns a small typed result: what
its checkpoint holds (coft.checkpoints) and what the next stage reads. coft.pipeline calls them in
the method's order; none of them knows about the others.

Images are U followed by any labelled shots (`unlabeled` counts U): shots keep their true labels,
enter S* and both clean sets, and are exempt from the filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from coft.backbone import Backbone
from coft.classifier import ImageClassifier
from coft.config import CoFTConfig
from coft.contrastive import MomentumContrast, queue_size
from coft.image_cache import ImageSource, training_inputs
from coft.losses import clean_probability
from coft.phase1 import PromptModel, score_images, train_prompt_model
from coft.phase2 import fine_tune, fresh_classifier, s_star_weights
from coft.progress import StageReport
from coft.pseudo_labels import s_star, validated_by
from coft.training import in_order


@dataclass
class ZeroShot:
    """Step 0: CLIP's labels for every image, and S*."""

    text_features: torch.Tensor  # [C, D] the class embeddings the labels came from
    labels: torch.Tensor  # [N] each image's zero-shot label
    confidence: torch.Tensor  # [N] its probability (per image, not [N, C]: 400 MB at 100k x 1,000)
    s_star_indices: torch.Tensor
    s_star_labels: torch.Tensor
    prompt_source: str  # "template", "template-ensemble", "user", "llm"
    prompt_fallback_reason: str | None = None


@dataclass
class TrainedPrompts:
    """Phase I: one prompt model, trained on `indices` with `labels` (S*, or a CoFT+ round's)."""

    state: dict[str, torch.Tensor]
    history: list[dict]
    indices: torch.Tensor
    labels: torch.Tensor
    predicted: torch.Tensor  # the trained model's own labels for its training set: its fit


@dataclass
class Filtered:
    """Collaborative filtering: model i's label of every image, and whether the other model accepts it."""

    labels: list[torch.Tensor]
    clean: list[torch.Tensor]
    p_clean: list[torch.Tensor]  # the other model's p_clean of the label
    confidence: list[torch.Tensor]  # the labelling model's own confidence (the baseline a filter must beat)

    def clean_set(self, model_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, labels) of model `model_index`'s (1 or 2) clean set."""
        kept = self.clean[model_index - 1].nonzero(as_tuple=True)[0]
        return kept, self.labels[model_index - 1][kept]


@dataclass
class FineTuned:
    """Phase II: one fully fine-tuned classifier member."""

    state: dict[str, torch.Tensor]
    history: list[dict]


@torch.no_grad()
def encode(backbone: Backbone, images: ImageSource, batch_size: int, report: StageReport | None = None,
           augmentation: nn.Module | None = None) -> torch.Tensor:
    """[N, D] unit-norm embeddings of the frozen backbone, on its device: of the test-time views, or
    of one random view of each image under `augmentation`."""
    features = []
    for positions in in_order(len(images), batch_size):
        with backbone.autocast():
            embedded = backbone.model.encode_image(training_inputs(images, positions, augmentation))
        features.append(torch.nn.functional.normalize(embedded.float(), dim=-1))
        if report is not None:
            report(int(positions[-1] + 1) / len(images), "encoding images")
    return torch.cat(features)


def zero_shot(backbone: Backbone, images: ImageSource, text_features: torch.Tensor, prompt_source: dict, top_k: int,
              unlabeled: int, shot_labels: torch.Tensor, batch_size: int, report: StageReport, views: int = 1,
              augmentation: nn.Module | None = None) -> ZeroShot:
    """CLIP's labels and S*, from the mean softmax over `views` views: the test-time one, then random
    ones under `augmentation`. Averaging views steadies the ranking that picks S*."""
    probabilities = torch.zeros(len(images), len(text_features))
    for view in range(views):
        image_features = encode(backbone, images, batch_size, lambda f, m: report((view + f) / views, m),
                                augmentation if view > 0 else None)
        probabilities += (backbone.logit_scale * image_features @ text_features.T).softmax(dim=1).cpu() / views
    indices, labels = s_star(probabilities, top_k, unlabeled, shot_labels)
    confidence, predicted = probabilities.max(dim=1)
    return ZeroShot(text_features.cpu(), predicted, confidence, indices, labels, **prompt_source)


def phase1(backbone: Backbone, class_names: Sequence[str], images: ImageSource, indices: torch.Tensor,
           labels: torch.Tensor, config: CoFTConfig, seed: int, report: StageReport) -> TrainedPrompts:
    """A fresh prompt model trained on images[indices] with `labels`, and its labels for them afterwards."""
    model, history = train_prompt_model(backbone, class_names, images, indices, labels, config.phase1, seed,
                                        lambda fraction, message: report(0.95 * fraction, message))
    s_pos, _ = score_images(model, backbone, images, config.eval_batch_size, indices=indices)
    return TrainedPrompts(model.state_dict(), history, indices, labels, s_pos.argmax(dim=1))


def next_round_set(previous: PromptModel, backbone: Backbone, images: ImageSource, top_k: int, unlabeled: int,
                   shot_labels: torch.Tensor, batch_size: int,
                   report: StageReport) -> tuple[torch.Tensor, torch.Tensor]:
    """CoFT+: round r's S*, the top-K per class of round r-1's model (the spec's confidence: the softmax
    of its positive prompts)."""
    s_pos, _ = score_images(previous, backbone, images, batch_size, report)
    return s_star((s_pos * previous.scale).softmax(dim=1), top_k, unlabeled, shot_labels)


def collaborative_filter(models: Sequence[PromptModel], backbone: Backbone, images: ImageSource, unlabeled: int,
                         shot_labels: torch.Tensor, batch_size: int, report: StageReport) -> Filtered:
    """Each model labels every image with its positive prompts; the other model keeps a label iff
    its s+ > s- for it."""
    scores = [score_images(model, backbone, images, batch_size, lambda f, m, i=i: report((i + f) / 2, m))
              for i, model in enumerate(models)]
    (pos1, neg1), (pos2, neg2) = scores
    labels1, labels2 = pos1.argmax(dim=1), pos2.argmax(dim=1)
    scale = backbone.logit_scale
    rows = torch.arange(len(labels1))
    # Model 2 validates model 1's labels, and model 1 validates model 2's.
    clean1, clean2 = validated_by(labels1, pos2, neg2), validated_by(labels2, pos1, neg1)
    for labels, clean in ((labels1, clean1), (labels2, clean2)):
        labels[unlabeled:] = shot_labels
        clean[unlabeled:] = True
    return Filtered(
        labels=[labels1, labels2], clean=[clean1, clean2],
        p_clean=[clean_probability(pos2[rows, labels1], neg2[rows, labels1], scale),
                 clean_probability(pos1[rows, labels2], neg1[rows, labels2], scale)],
        confidence=[(pos1 * scale).softmax(dim=1).max(dim=1).values, (pos2 * scale).softmax(dim=1).max(dim=1).values])


def phase2(backbone: Backbone, images: ImageSource, text_features: torch.Tensor, filtered: Filtered,
           model_index: int, config: CoFTConfig, seed: int, contrastive: bool, report: StageReport,
           s_star: torch.Tensor, s_star_weight: float) -> FineTuned:
    """A fresh pre-trained vision tower and text head, fully fine-tuned on model `model_index`'s clean
    set; with `contrastive`, CoFT+'s momentum contrastive term on every image too. The images at
    `s_star` weigh `s_star_weight` in the CE."""
    model = fresh_classifier(backbone, text_features, config.phase2)
    term = contrastive_term(model, backbone, config, len(images)) if contrastive else None
    weights = s_star_weights(len(images), s_star, s_star_weight)
    history = fine_tune(model, backbone, images, filtered.labels[model_index - 1], filtered.clean[model_index - 1],
                        config.phase2, seed, report, contrastive=term, weights=weights)
    return FineTuned(model.state_dict(), history)


def contrastive_term(model: ImageClassifier, backbone: Backbone, config: CoFTConfig, images: int) -> MomentumContrast:
    plus = config.coft_plus
    length = plus.queue_size or queue_size(images, config.phase2.batch_size, plus.queue_max)
    return MomentumContrast(model.visual, backbone.model_cfg["embed_dim"], backbone.preprocess_cfg, backbone.device,
                            momentum=plus.momentum, temperature=plus.temperature, weight=plus.contrastive_weight,
                            queue_length=length, hflip=config.phase2.hflip, shared_view=plus.shared_view)

"""The Phase I losses (paper Eqs. 4-6).

s+ and s- are cosine similarities between an image and the positive / negative prompt of each
class; `scale` is CLIP's logit scale, 1/tau.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, gce_q: float = 0.0,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """The cross-entropy, or with gce_q > 0 the generalised cross-entropy (1 - p_y^q) / q of Zhang &
    Sabuncu (2018); with `weights`, their weighted mean over the samples. `labels` are class indices
    [B] or class probabilities [B, C] (MixUp's targets: each class's loss weighed by its probability).

    GCE tends to the cross-entropy as q -> 0 and to the mean absolute error at q = 1. It weighs each
    sample's gradient by p_y^q, so a label the model keeps disagreeing with (often a wrong one) pulls less.
    """
    if gce_q == 0:
        losses = F.cross_entropy(logits, labels.to(logits.dtype) if labels.ndim == 2 else labels, reduction="none")
    elif labels.ndim == 2:
        probabilities = logits.float().softmax(dim=1).clamp_min(1e-12)
        losses = (labels * (1 - probabilities ** gce_q) / gce_q).sum(dim=1)
    else:
        p_label = logits.float().softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
        losses = (1 - p_label.clamp_min(1e-12) ** gce_q) / gce_q
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()


def positive_loss(s_pos: torch.Tensor, labels: torch.Tensor, scale: float, gce_q: float = 0.0) -> torch.Tensor:
    """L1: cross-entropy of the positive-prompt classifier against the pseudo-labels (or its
    generalised form, `classification_loss`)."""
    return classification_loss(s_pos * scale, labels, gce_q)


def clean_probability(s_pos: torch.Tensor, s_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """p_clean = exp(s+/tau) / (exp(s+/tau) + exp(s-/tau)) = sigmoid((s+ - s-) / tau)."""
    return torch.sigmoid((s_pos - s_neg) * scale)


def random_other_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A class drawn uniformly from the C-1 classes that are not the label."""
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator, device="cpu")
    return (labels + offsets.to(labels.device, non_blocking=True)) % num_classes


def confusable_other_labels(logits: torch.Tensor, labels: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """A class other than the label, drawn with the probability the classifier gives it.

    The paper draws uniformly, so the negative prompt learns to reject labels that are plainly
    wrong; real pseudo-label errors are confusions with a similar class, which this draw targets.
    """
    probabilities = logits.detach().float().softmax(dim=1).cpu()
    probabilities[torch.arange(len(labels)), labels.cpu()] = 0.0
    # A row whose mass sits entirely on its label (underflow) falls back to a uniform draw.
    empty = probabilities.sum(dim=1) <= 0
    probabilities[empty] = 1.0
    probabilities[empty, labels.cpu()[empty]] = 0.0
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(labels.device)


def negative_loss(s_pos: torch.Tensor, s_neg: torch.Tensor, labels: torch.Tensor, others: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """L2 = -mean[log p_clean_y + log(1 - p_clean_yhat)].

    The sign is the one of the paper's prose and of DeFT's code, not the misprinted Eq. 6. Written
    with logsigmoid, since log(sigmoid(d)) and log(1 - sigmoid(d)) = logsigmoid(-d) are stable.
    """
    margin = (s_pos - s_neg) * scale
    rows = torch.arange(labels.shape[0], device=labels.device)
    return -(F.logsigmoid(margin[rows, labels]) + F.logsigmoid(-margin[rows, others])).mean()

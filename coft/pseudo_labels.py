"""Which pseudo-labels to train on: top-K per class (S*) and collaborative filtering (S_clean)."""

from __future__ import annotations

import torch


def top_k_per_class(probabilities: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S*: for every class, the k images predicted as that class with the highest probability.

    Returns (indices into the image set, their pseudo-labels). A class predicted for fewer than
    k images contributes all of them; a class predicted for none contributes nothing.
    """
    predicted = probabilities.argmax(dim=1)
    indices, labels = [], []
    for c in range(probabilities.shape[1]):
        members = (predicted == c).nonzero(as_tuple=True)[0]
        if len(members) == 0:
            continue
        order = probabilities[members, c].argsort(descending=True, stable=True)
        chosen = members[order[:k]]
        indices.append(chosen)
        labels.append(torch.full_like(chosen, c))
    if not indices:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(indices), torch.cat(labels)


def validated_by(labels: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """Collaborative filtering: the other model accepts label y of image x iff s+_y > s-_y (strict).

    `labels` come from one model; `s_pos`, `s_neg` [N, C] are the other model's similarities.
    """
    rows = torch.arange(labels.shape[0])
    return s_pos[rows, labels] > s_neg[rows, labels]


def s_star(probabilities: torch.Tensor, k: int, unlabeled: int,
           shot_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S*: the top-k per class among the unlabeled images (the first `unlabeled` rows), then every
    labelled shot that follows them, with its true label."""
    indices, labels = top_k_per_class(probabilities[:unlabeled], k)
    shot_labels = torch.empty(0, dtype=torch.long) if shot_labels is None else shot_labels
    shots = torch.arange(unlabeled, unlabeled + len(shot_labels))
    return torch.cat([indices, shots]), torch.cat([labels, shot_labels])

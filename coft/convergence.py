"""Did a stage fit the labels it trained on? The label-free convergence check every job reports.

Without labels a user cannot see whether a model learned; but every training stage has a training
set with labels of its own (Phase I: S* and its pseudo-labels; Phase II: a clean set and the other
model's labels), and whether the trained model reproduces them is measurable. A model that does
not has stopped short of what its schedule was meant to buy: its teacher's errors are not the
reason, its budget is.

Thresholds, on the training set's test-time views:
- Phase I, 90%: S* is the surest K images per class, 80-95% right on the development tasks; a
  prompt model that has fitted it reproduces nearly all of its labels, the wrong ones included.
- Phase II, 80%: a clean set is larger and noisier (50-85% right) and a vision tower fine-tuned for a
  few epochs need not memorise its noise; below 80% it has not learned the clean labels themselves.

Agreement says whether a model fits, not whether training got it there. A model that starts at the
zero-shot classifier (Phase I from "a photo of a", Phase II's text head) already agrees with most
labels that came from zero-shot: untrained, the dev tasks' Phase I models reproduce 94-99% of S*
(benchmarks/RESULTS.md, "What an untrained model's fit looks like"). So each Fit also carries its
first epoch's losses beside its last: what training changed is read there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MIN_AGREEMENT = {"phase1": 0.9, "phase2": 0.8}


@dataclass(frozen=True)
class Fit:
    """How well one trained model reproduces the labels of its own training set."""

    stage: str  # e.g. "phase1-model1", "phase2-model2"
    agreement: float  # fraction of the training set whose predicted class is its label
    images: int
    first_loss: dict[str, float | None]  # the first recorded epoch's training losses
    final_loss: dict[str, float | None]  # the last epoch's

    @property
    def threshold(self) -> float:
        return MIN_AGREEMENT[self.stage.split("-", 1)[0]]

    def as_metrics(self) -> dict[str, Any]:
        return {"agreement": round(self.agreement, 4), "images": self.images, "first_loss": self.first_loss,
                "final_loss": self.final_loss, "threshold": self.threshold}

    def warning(self) -> dict[str, str] | None:
        """A warning for the job's metrics when the model did not fit its training set."""
        if self.images == 0 or self.agreement >= self.threshold:
            return None
        return {"code": "did-not-fit", "stage": self.stage,
                "message": f"{self.stage} reproduces {self.agreement:.0%} of its {self.images} training labels, "
                           f"under the {self.threshold:.0%} a fitted model reaches: it stopped short of what "
                           f"its schedule should buy (more steps or a higher learning rate would help)"}


def fit(stage: str, predicted: torch.Tensor, labels: torch.Tensor, history: list[dict]) -> Fit:
    """The Fit of a model whose predictions on its training set are `predicted`."""
    agreement = float((predicted.cpu() == labels.cpu()).float().mean()) if len(labels) else 0.0
    first, final = (_losses(history[0]), _losses(history[-1])) if history else ({}, {})
    return Fit(stage, agreement, int(len(labels)), first, final)


def _losses(entry: dict) -> dict[str, float | None]:
    """A history entry's losses, without its epoch number."""
    return {key: value for key, value in entry.items() if key != "epoch"}


def record(metrics: dict[str, Any], fit: Fit) -> None:
    """A stage's fit into the run's metrics (`fit`), with a warning when it did not fit."""
    metrics.setdefault("fit", {})[fit.stage] = fit.as_metrics()
    warning = fit.warning()
    if warning is not None:
        metrics.setdefault("warnings", []).append(warning)

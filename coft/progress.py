"""Progress of a run: which stage, how far within it, and overall.

Training functions take a plain `report(fraction, message)` callable for their own work; the
pipeline turns those into `Progress` events with an overall fraction, weighting each stage by its
expected cost. A callback may raise (the service does, to cancel a job): the run stops there,
and its checkpoints let it resume later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

StageReport = Callable[[float, str], None]


@dataclass
class Progress:
    stage: str
    stage_fraction: float
    fraction: float  # of the whole run, 0..1
    message: str = ""
    elapsed_s: float = 0.0
    eta_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        """The stage was loaded from an earlier attempt's checkpoint, not run."""
        return self.message == RESUMED


RESUMED = "resumed from checkpoint"
ProgressCallback = Callable[[Progress], None]


class ProgressTracker:
    def __init__(self, callback: ProgressCallback | None, stage_costs: dict[str, float]):
        total = sum(stage_costs.values()) or 1.0
        self.callback = callback
        self.weights = {name: cost / total for name, cost in stage_costs.items()}
        self.started = time.monotonic()
        self.metrics: dict[str, Any] = {}
        self._first_fraction: float | None = None

    def _base(self, stage: str) -> float:
        names = list(self.weights)
        return sum(self.weights[n] for n in names[:names.index(stage)])

    def reporter(self, stage: str) -> StageReport:
        def report(stage_fraction: float, message: str = "") -> None:
            self.emit(stage, stage_fraction, message)
        return report

    def emit(self, stage: str, stage_fraction: float, message: str = "") -> None:
        if self.callback is None:
            return
        stage_fraction = min(max(stage_fraction, 0.0), 1.0)
        fraction = self._base(stage) + self.weights[stage] * stage_fraction
        elapsed = time.monotonic() - self.started
        if self._first_fraction is None:
            self._first_fraction = fraction  # a resumed run starts part-way: measure the rate from here
        done_here = fraction - self._first_fraction
        eta = elapsed * (1 - fraction) / done_here if done_here > 1e-3 else None
        self.callback(Progress(stage=stage, stage_fraction=stage_fraction, fraction=fraction, message=message,
                               elapsed_s=elapsed, eta_s=eta, metrics=dict(self.metrics)))

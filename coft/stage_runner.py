"""Running one named stage of a run: loaded from its checkpoint when an earlier attempt finished it,
else computed under the stage's own seeded randomness and checkpointed; reported either way."""

from __future__ import annotations

from typing import Callable, TypeVar

from coft import seeding
from coft.checkpoints import Checkpoints
from coft.progress import RESUMED, ProgressTracker, StageReport

Result = TypeVar("Result")


class StageRunner:
    def __init__(self, tracker: ProgressTracker, seed: int, checkpoints: Checkpoints | None = None):
        self.tracker, self.seed, self.checkpoints = tracker, seed, checkpoints

    def run(self, name: str, compute: Callable[[StageReport], Result], kind: type[Result] | None = None) -> Result:
        """`compute(report)` for stage `name`, or its checkpoint (`kind`: the result's type; None:
        not checkpointed)."""
        if self.checkpoints is not None and kind is not None:
            saved = self.checkpoints.load(name, kind)
            if saved is not None:
                self.tracker.emit(name, 1.0, RESUMED)
                return saved
        self.tracker.emit(name, 0.0, "starting")
        with seeding.stage_randomness(self.seed, list(self.tracker.weights).index(name)):
            result = compute(self.tracker.reporter(name))
        if self.checkpoints is not None and kind is not None:
            self.checkpoints.save(name, result)
        self.tracker.emit(name, 1.0, "done")
        return result

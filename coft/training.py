"""Training mechanics shared by every stage and baseline: batches, the optimiser step, loss means.

The loops in coft.phase1, coft.phase2 and coft.baselines differ only in their losses; what they
share lives here once. Nothing here reads a value back from the device: losses are summed on the
device and read once per epoch, so a GPU never waits for the host between steps.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch

from coft.backbone import grad_scaler


def epoch_batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of positions 0..count-1, shuffled by `generator`, in batches of `batch_size`.

    A trailing batch of one is dropped: BatchNorm-free CLIPs would cope, but a 1-sample step is noise.
    """
    order = torch.randperm(count, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def steps_per_epoch(count: int, batch_size: int) -> int:
    """How many batches `epoch_batches` makes of `count` samples."""
    steps = -(-count // batch_size)
    return steps - 1 if steps > 1 and count % batch_size == 1 else steps


def epochs_for(count: int, batch_size: int, epochs: int, min_steps: int = 0) -> int:
    """Passes over `count` samples: `epochs`, or more when they make fewer than `min_steps` steps.

    A schedule counted in epochs shrinks with the training set: 20 epochs of 10 classes x 16 images
    are 100 steps, too few to fit from random prompts; a floor in steps keeps what it buys.
    """
    per_epoch = steps_per_epoch(count, batch_size)
    if per_epoch == 0:
        return 0
    return max(epochs, -(-min_steps // per_epoch))


def history_every(epochs: int, entries: int = 20) -> int:
    """Record losses every this many epochs, so that a long schedule keeps about `entries` of them."""
    return max(1, -(-epochs // entries))


def in_order(count: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Positions 0..count-1 in order, in batches: for passes that only look (scoring, prediction)."""
    return iter(torch.arange(count).split(batch_size))


class Optimiser:
    """SGD with momentum and weight decay, cosine-annealed over a known number of steps, with loss
    scaling where float16 autocast needs it (GPUs without bfloat16)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter] | Iterable[dict], *, lr: float, momentum: float,
                 weight_decay: float, total_steps: int, device: torch.device):
        self.optimizer = torch.optim.SGD(list(parameters), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(1, total_steps))
        self.scaler = grad_scaler(device)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()

    def skip(self) -> None:
        """A batch with nothing to learn from still advances the schedule, so the run keeps its length."""
        with warnings.catch_warnings():  # torch warns when the schedule moves before the first optimiser step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.schedule.step()


class LossMeans:
    """Per-epoch means of named losses, summed on the device and read back once."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor, count: int = 1) -> None:
        """Add a batch mean `value` that stands for `count` samples."""
        weighted = value.detach().float() * count
        self.sums[name] = self.sums[name] + weighted if name in self.sums else weighted
        self.counts[name] = self.counts.get(name, 0) + count

    def read(self, *names: str) -> dict[str, float | None]:
        """The means of `names` (None where nothing was added: nothing was fitted), in one device read."""
        present = [name for name in names if self.counts.get(name)]
        values = torch.stack([self.sums[name] for name in present]).tolist() if present else []
        means: dict[str, float | None] = {name: None for name in names}
        for name, total in zip(present, values):
            means[name] = total / self.counts[name]
        return means

"""Which seed each part of a run draws from, in one place.

Two things are random in a run: the trainable parts' initialisation and data order (generators
seeded per model, below) and the augmentations (kornia draws from torch's global generator, which
each stage re-seeds from its position in the run). Seeded this way, a stage computes the same
whether it runs after the others or alone on a resume, and the two models of a pair differ only by
their seeds, as the method wants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def model_seed(seed: int, model_index: int) -> int:
    """Model 1 or 2 of a pair: its prompt initialisation and the order of its S*."""
    return seed * 1000 + model_index * 10


def round_seed(seed: int, model_index: int, round_: int) -> int:
    """CoFT+'s round r of a model: a fresh model, so a seed of its own."""
    return model_seed(seed, model_index) + 100 * (round_ - 1)


def phase2_seed(seed: int, model_index: int) -> int:
    """The data order of Phase II's model 1 or 2."""
    return model_seed(seed, model_index) + 1


@contextlib.contextmanager
def stage_randomness(seed: int, position: int) -> Iterator[None]:
    """torch's global generator, seeded for the stage at `position` in the run, restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + position)
        yield

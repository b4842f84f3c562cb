"""A run's stages, in order, with what each is expected to cost (for progress and ETA).

Costs are in image forward passes of the backbone; a training step counts three (forward and
backward). The order is the order `coft.pipeline` runs them in, and a stage's position seeds its
randomness (coft.seeding).
"""

from __future__ import annotations

from coft.config import CoFTConfig


def round_top_k(config: CoFTConfig, round_: int, unlabeled: int, classes: int) -> int:
    """Images per class in round r's S*: K, or r*K when CoFT+'s rounds grow it (coft_plus.round_top_k)."""
    top_k = config.pseudo_labels.images_per_class(unlabeled, classes)
    return top_k * (round_ if config.coft_plus.round_top_k == "grow" else 1)


def rounds(config: CoFTConfig, method: str) -> int:
    """Phase I rounds per model: CoFT+'s R, one for CoFT."""
    return config.coft_plus.rounds if method == "coft+" else 1


def s_star_weight(config: CoFTConfig, method: str) -> float:
    """Each S* image's weight in Phase II's CE: CoFT+'s own (coft_plus.s_star_weight), else phase2's."""
    return config.coft_plus.s_star_weight if method == "coft+" else config.phase2.s_star_weight


def stage_costs(method: str, config: CoFTConfig, images: int, classes: int, shots: int = 0) -> dict[str, float]:
    """Every stage of a run of `method` on `images` (shots included), in order, and its expected cost."""
    costs = {"decode": 0.5 * images, "zero-shot": float(images * config.pseudo_labels.views)}
    if method in ("coft", "coft+"):
        epochs, unlabeled = config.phase1.epochs, images - shots
        for i in (1, 2):
            for round_ in range(1, rounds(config, method) + 1):
                s_star = min(unlabeled, classes * round_top_k(config, round_, unlabeled, classes)) + shots
                scoring = images if round_ > 1 else 0  # the previous round's model labels U first
                costs[f"phase1-model{i}" + (f"-round{round_}" if round_ > 1 else "")] = scoring + 3.0 * epochs * s_star
        costs["filter"] = 2.0 * images
        # CE on the clean ~70%; the contrastive term adds a key pass without gradient on all of U and a
        # query pass with gradient, or, when the two share a view, turns the CE pass into one on all.
        per_image = 3.0 * 0.7
        plus = config.coft_plus
        if method == "coft+" and plus.contrastive:
            per_image = 3.0 + 1.0 if plus.shared_view != "none" else per_image + 3.0 + 1.0
        for i in (1, 2):
            costs[f"phase2-model{i}"] = per_image * config.phase2.epochs * images
    costs["finish"] = 2.0 * images
    return costs

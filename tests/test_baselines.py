"""The baselines (coft.baselines) on the tiny random CLIP: what each trains, and that each yields a Classifier."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from coft.baselines import (CoOpConfig, FixMatchConfig, LinearProbeConfig, TopKFineTuneConfig, UPLConfig,
                            align_distribution, coop, fixmatch, linear_probe, sample_shots, top_k_fine_tune, upl,
                            zero_shot)
from coft.augment import StrongAugmentation
from coft.classifier import Classifier
from coft.training import steps_per_epoch
from coft.prompts import TEMPLATE_ENSEMBLE, class_text_features

CLASSES = ["red square", "green circle", "blue thing"]
TINY_COOP = CoOpConfig(context_tokens=4, epochs=2, batch_size=4)


def visual_state(backbone):
    return {k: v.clone() for k, v in backbone.model.visual.state_dict().items()}


def test_zero_shot_single_and_ensemble(tiny_backbone, tiny_images):
    single, ensemble = zero_shot(tiny_backbone, CLASSES), zero_shot(tiny_backbone, CLASSES, ensemble=True)
    torch.testing.assert_close(ensemble.members[0].head.weight,
                               class_text_features(tiny_backbone, CLASSES, TEMPLATE_ENSEMBLE)
                               * tiny_backbone.logit_scale)
    assert not torch.allclose(single.members[0].head.weight, ensemble.members[0].head.weight)
    assert single.predict(tiny_images).probabilities.shape == (8, 3)


def test_coop_learns_only_the_prompt_and_leaves_clip_alone(tiny_backbone, tiny_images):
    before = visual_state(tiny_backbone)
    classifier = coop(tiny_backbone, CLASSES, tiny_images, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), TINY_COOP)
    assert isinstance(classifier, Classifier)
    for name, value in tiny_backbone.model.visual.state_dict().items():
        assert torch.equal(value, before[name])
    member = classifier.members[0]
    for name, value in member.visual.state_dict().items():  # CoOp's vision tower is CLIP's
        assert torch.equal(value, before[name])
    zero = zero_shot(tiny_backbone, CLASSES)
    assert not torch.allclose(member.head.weight, zero.members[0].head.weight)  # the learned prompts


def test_upl_trains_on_the_top_k(tiny_backbone, tiny_images):
    classifier = upl(tiny_backbone, CLASSES, tiny_images, UPLConfig(top_k=2, coop=TINY_COOP))
    assert classifier.predict(tiny_images).probabilities.shape == (8, 3)


def test_linear_probe_fits_its_shots(tiny_backbone, tiny_images):
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    classifier = linear_probe(tiny_backbone, CLASSES, tiny_images, labels, LinearProbeConfig(inverse_l2=1e4))
    # weakly regularised, 8 points in 32 dimensions: separable, every training shot right
    assert classifier.predict(tiny_images).indices.tolist() == labels.tolist()
    strong = linear_probe(tiny_backbone, CLASSES, tiny_images, labels, LinearProbeConfig(inverse_l2=1e-4))
    assert strong.members[0].head.weight.norm() < classifier.members[0].head.weight.norm()


def test_fixmatch_threshold_gates_the_update(tiny_backbone, tiny_images):
    config = FixMatchConfig(epochs=1, batch_size=4, threshold=1.01)  # no target can pass
    before = visual_state(tiny_backbone)
    classifier, info = fixmatch(tiny_backbone, CLASSES, tiny_images, config)
    assert info["mask_rate"] == 0.0
    for name, value in classifier.members[0].visual.state_dict().items():
        assert torch.equal(value, before[name])  # nothing passed: nothing trained
    # the head is Phase II's: head_scale x the unit text embeddings, whatever the CLIP's logit scale
    row_norms = classifier.members[0].head.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, config.head_scale))
    assert float(tiny_backbone.logit_scale) != pytest.approx(config.head_scale)  # the two cases differ
    unscaled, _ = fixmatch(tiny_backbone, CLASSES, tiny_images, replace(config, head_scale=None))
    row_norms = unscaled.members[0].head.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, float(tiny_backbone.logit_scale)))
    config = FixMatchConfig(epochs=1, batch_size=4, threshold=0.0)  # every target passes
    classifier, info = fixmatch(tiny_backbone, CLASSES, tiny_images, config)
    assert info["mask_rate"] == 1.0
    assert any(not torch.equal(v, before[k]) for k, v in classifier.members[0].visual.state_dict().items())
    for name, value in tiny_backbone.model.visual.state_dict().items():  # a copy trained, not the backbone
        assert torch.equal(value, before[name])


def test_distribution_alignment_evens_out_a_collapsing_marginal():
    """Every row leans to class 0; once the running mean has seen that, the aligned targets do not."""
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.55, 0.4, 0.05]])
    mean = torch.full((3,), 1 / 3)
    aligned = align_distribution(probabilities, mean, momentum=0.0)  # momentum 0: the mean is this batch
    torch.testing.assert_close(mean, probabilities.mean(dim=0))
    torch.testing.assert_close(aligned.sum(dim=1), torch.ones(3))
    assert probabilities.argmax(dim=1).tolist() == [0, 0, 0]
    assert aligned.argmax(dim=1).tolist() == [1, 2, 1]
    expected = probabilities[0] / mean
    torch.testing.assert_close(aligned[0], expected / expected.sum())


def test_top_k_fine_tune_trains_the_whole_tower_on_the_top_k_alone(tiny_backbone, tiny_images):
    from coft.config import Phase2Config

    before = visual_state(tiny_backbone)
    config = TopKFineTuneConfig(top_k=2, phase2=Phase2Config(epochs=2, batch_size=4))
    classifier, info = top_k_fine_tune(tiny_backbone, CLASSES, tiny_images, config, seed=1)
    assert isinstance(classifier, Classifier) and len(classifier.members) == 1
    assert info["images"] <= 2 * len(CLASSES)
    # as many steps as Phase II takes on all 8 images (2 epochs x 2 batches of 4)
    assert info["epochs"] == math.ceil(4 / steps_per_epoch(info["images"], 4))
    tuned = classifier.members[0].visual.state_dict()
    assert all(not torch.equal(tuned[k], v) for k, v in before.items() if v.is_floating_point())
    assert visual_state(tiny_backbone).keys() == before.keys()
    assert all(torch.equal(visual_state(tiny_backbone)[k], v) for k, v in before.items())  # the backbone is left alone


def test_strong_view_is_random(tiny_backbone, tiny_source):
    config = FixMatchConfig()
    strong = StrongAugmentation(tiny_backbone.preprocess_cfg, config.crop_scale_min, config.hflip,
                                config.randaugment_ops, config.randaugment_magnitude)
    pixels = tiny_source.pixels(torch.tensor([0, 0]))
    first, second = tiny_source.view(pixels, strong), tiny_source.view(pixels, strong)
    assert first.shape == (2, 3, 32, 32)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first, second)


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_sample_shots(shots):
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 10)
    chosen = sample_shots(labels, shots, seed=3)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [min(shots, 5), min(shots, 3), shots]
    assert chosen.tolist() == sample_shots(labels, shots, seed=3).tolist()
    assert len(set(chosen.tolist())) == len(chosen)

"""The shipped proxy CLIP and its world: corpus, pretraining loss, target tasks."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from coft.backbone import PROXY_DIR, load_backbone
from coft.config import CoFTConfig
from coft.pipeline import LabelledImages, adapt
from coft.proxy import corpus
from coft.proxy.pretrain import match_matrix, multi_positive_clip_loss
from coft.proxy.render import HELDOUT_BACKGROUNDS, HELDOUT_FONTS, PRETRAIN_BACKGROUNDS, PRETRAIN_FONTS, Scene, render
from coft.proxy.tasks import TASKS, load_task


@pytest.fixture(scope="module")
def proxy():
    return load_backbone("proxy", device="cpu")


def test_shipped_weights_are_open_clip_local_dir_format_and_small():
    config = json.loads((PROXY_DIR / "open_clip_config.json").read_text())
    assert {"model_cfg", "preprocess_cfg"} <= set(config)
    weights = PROXY_DIR / "open_clip_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    # open_clip itself loads it, with no help from us: the format is open_clip's own.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{PROXY_DIR}")
    assert isinstance(model.visual, open_clip.transformer.VisionTransformer)
    assert model.visual.image_size == (config["preprocess_cfg"]["size"],) * 2


def test_proxy_is_the_default_backbone(proxy):
    assert proxy.model_id == "proxy"
    size = json.loads((PROXY_DIR / "open_clip_config.json").read_text())["preprocess_cfg"]["size"]
    assert proxy.preprocess_cfg["size"] in (size, [size, size])
    assert not any(p.requires_grad for p in proxy.model.parameters())


def test_identical_and_compatible_captions_are_positives():
    seven = Scene(kind="digit", label=7, colour="red", background="plain", background_colour="white")
    other_seven = Scene(kind="digit", label=7, colour="blue", background="plain", background_colour="white")
    circle = Scene(kind="shape", label=0, colour="red", background="plain", background_colour="white")
    attributes = [corpus.scene_attributes(s) for s in (seven, other_seven, circle)]
    said = [{"object": ("digit", 7)}, {"object": ("digit", 7)}, {"object": ("shape", 0), "colour": "red"}]
    matches = match_matrix(said, attributes)
    # "a seven." is true of both sevens (duplicates are positives of each other), not of the circle;
    # "a red circle." is true of the circle only.
    assert matches.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_multi_positive_loss_does_not_push_duplicates_apart():
    def features(separation: float) -> torch.Tensor:
        rows = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, separation], [0.0, 1.0, 0.0]])
        return torch.nn.functional.normalize(rows, dim=-1)

    duplicates = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]])  # images 0 and 1 share their caption
    as_negatives = torch.eye(3)  # plain InfoNCE: only the drawn caption is a positive

    def loss(separation, matches):
        f = features(separation)
        return multi_positive_clip_loss(f, f, 20.0, matches)

    # Pulling the two duplicates apart lowers plain InfoNCE (it thinks they are negatives) but
    # raises the multi-positive loss, which is what lets the model learn from a batch full of "a seven.".
    assert loss(0.5, as_negatives) < loss(0.0, as_negatives)
    assert loss(0.5, duplicates) > loss(0.0, duplicates)


def test_captions_only_say_what_is_true():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene, text, said = corpus.sample(rng)
        assert corpus.caption_is_true_of(said, corpus.scene_attributes(scene))
        assert text.endswith(".")


def test_rendering_is_deterministic_and_tasks_are_shifted():
    scene = Scene(kind="digit", label=3, colour="green", background="wood", background_colour="gray",
                  font="handwritten", degradations=["heavy-noise"], seed=11)
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))
    assert not set(HELDOUT_FONTS) & set(PRETRAIN_FONTS)
    assert not set(HELDOUT_BACKGROUNDS) & set(PRETRAIN_BACKGROUNDS)
    for spec in TASKS.values():
        shifted = (set(spec.fonts) - set(PRETRAIN_FONTS) if spec.kind == "digit" else set()) | \
                  (set(spec.backgrounds) - set(PRETRAIN_BACKGROUNDS)) | set(spec.degradations)
        assert shifted, f"{spec.name} shows nothing the corpus did not"


def test_tasks_are_deterministic_and_balanced():
    first = load_task("digits-occluded", 40, 20)
    again = load_task("digits-occluded", 40, 20)
    assert first.train_labels == again.train_labels
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first.train_images, again.train_images))
    assert first.train_labels != first.test_labels[:len(first.train_labels)]
    counts = np.bincount(first.train_labels, minlength=10)
    assert counts.min() == counts.max() == 4


@pytest.mark.parametrize("name", list(TASKS))
def test_zero_shot_accuracy_leaves_room_to_adapt(proxy, name):
    """The proxy contract: zero-shot between 25% and 75% on every target task."""
    task = load_task(name, num_train=20, num_test=TASKS[name].num_test)
    result = adapt(task.train_images, task.class_names, method="zero-shot", backbone=proxy,
                   evaluation=LabelledImages(task.test_images, torch.tensor(task.test_labels)))
    assert 0.25 <= result.metrics["accuracy"]["zero_shot"] <= 0.75


@pytest.fixture(scope="module")
def coft_on_a_small_task(proxy):
    task = load_task("digits-handwritten", num_train=400, num_test=300)
    config = CoFTConfig.from_dict({"phase1": {"hflip": False}, "phase2": {"hflip": False}})
    result = adapt(task.train_images, task.class_names, method="coft", backbone=proxy, config=config,
                   evaluation=LabelledImages(task.test_images, torch.tensor(task.test_labels)))
    return task, result


def _precision(task, selection) -> float:
    indices, labels = selection
    return float((labels == torch.tensor(task.train_labels)[indices]).float().mean())


@pytest.mark.slow
def test_filtered_labels_are_more_precise_than_zero_shot(coft_on_a_small_task):
    task, result = coft_on_a_small_task
    zero_shot = _precision(task, result.selections["zero_shot"])
    assert _precision(task, result.selections["s_star"]) > zero_shot
    for model in (1, 2):
        assert _precision(task, result.selections[f"clean_model{model}"]) > zero_shot


@pytest.mark.slow
def test_coft_beats_zero_shot_on_a_proxy_task(coft_on_a_small_task):
    task, result = coft_on_a_small_task
    accuracy = result.metrics["accuracy"]
    print(accuracy)
    # In test images, not float fractions: 0.08 of 300 is 24 images, and a float sum may miss it by 1e-8.
    correct = {stage: round(value * len(task.test_labels)) for stage, value in accuracy.items()}
    assert correct["final"] - correct["zero_shot"] >= 0.08 * len(task.test_labels), correct

"""Every open_clip family, one code path: a tiny random-weight model of each, through coft.

Checked for each: zero-shot equals the model's own encode_image / encode_text; a Phase I model with
no prompt tokens (and one whose context is a phrase's word embeddings) computes exactly what the
frozen model does; a short adapt() runs and its artifact reloads. (A Hugging Face text tower goes
through the same path, coft.openclip.token_embedding's `get_input_embeddings`, but building one needs
`transformers` and a model config from the hub, neither of which this project has here.)
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from coft.backbone import load_backbone
from coft.classifier import Classifier, zero_shot_classifier
from coft.config import CoFTConfig, Phase1Config, Phase2Config
from coft.image_cache import cached_images
from coft.openclip import build_vision_tower, vision_depths
from coft.phase1 import PromptModel
from coft.phase2 import fine_tune, fresh_classifier
from coft.pipeline import adapt
from tests.conftest import TINY_PREPROCESS_CFG, draw_image

TEXT = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
VIT = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
FAMILIES = {
    "vit": {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": TEXT},
    "modified-resnet": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8,
                                                        "head_width": 8}, "text_cfg": TEXT},
    "timm": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "test_resnet", "timm_pool": "avg",
                                             "timm_proj": "linear"}, "text_cfg": TEXT},
    # CoCa: attentional pooling, a tower that returns (pooled, tokens), a text class token
    "coca": {"embed_dim": 32, "custom_text": True,
             "vision_cfg": {**VIT, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
             "text_cfg": {**TEXT, "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {**TEXT, "attn_pooler_heads": 2}},
    # SigLIP-style text tower: bidirectional, pooled from the last position, a logit bias
    "siglip-style": {"embed_dim": 32, "custom_text": True, "init_logit_bias": -10.0, "vision_cfg": VIT,
                     "text_cfg": {**TEXT, "no_causal_mask": True, "pool_type": "last", "proj_bias": True}},
    # a short text context: the prompt context is shortened to fit the class names
    "short-context": {"embed_dim": 32, "vision_cfg": VIT, "text_cfg": {**TEXT, "context_length": 12}},
}
CLASSES = ["red square", "green circle", "blue thing"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    torch.manual_seed(7)
    model_cfg = FAMILIES[name]
    open_clip_model = _build(model_cfg)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                 "preprocess_cfg": TINY_PREPROCESS_CFG}))
    save_file({k: v.contiguous() for k, v in open_clip_model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    return name, load_backbone(f"local-dir:{directory}", device="cpu")


def _build(model_cfg: dict) -> torch.nn.Module:
    if "multimodal_cfg" in model_cfg:
        return open_clip.CoCa(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    if model_cfg.get("custom_text"):
        return open_clip.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    return open_clip.CLIP(**model_cfg)


@pytest.fixture(scope="module")
def images():
    return [draw_image(i) for i in range(8)]


def test_zero_shot_is_the_models_own_encode_image_and_encode_text(family, images):
    _, backbone = family
    clip = backbone.model
    classifier = zero_shot_classifier(backbone, CLASSES)
    pixels = torch.stack([backbone.eval_transform()(image) for image in images])
    with torch.no_grad():
        text = F.normalize(clip.encode_text(backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
        image = F.normalize(clip.encode_image(pixels), dim=-1)
    expected = (backbone.logit_scale * image @ text.T).softmax(dim=1)
    torch.testing.assert_close(classifier.predict(images).probabilities, expected, atol=1e-5, rtol=1e-5)


def test_phase1_without_prompt_tokens_is_the_frozen_model(family, images):
    _, backbone = family
    clip = backbone.model
    config = Phase1Config(context_tokens=0, vpt_tokens=0)
    model = PromptModel(backbone, CLASSES, config, seed=0)
    pixels = torch.stack([backbone.eval_transform()(image) for image in images])
    with torch.no_grad():
        s_pos, s_neg = model.similarities(pixels)
        text = F.normalize(clip.encode_text(backbone.tokenizer([f"{c}." for c in CLASSES])), dim=-1)
        image = F.normalize(clip.encode_image(pixels), dim=-1)
    torch.testing.assert_close(s_pos, image @ text.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_neg, s_pos)  # no context: both prompts are the bare class name


def test_a_phrase_context_reproduces_the_phrase_through_the_models_own_text_path(family):
    name, backbone = family
    config = Phase1Config(context_init="a photo of a", context_init_std=0.0)
    model = PromptModel(backbone, CLASSES, config, seed=0)
    with torch.no_grad():
        expected = F.normalize(backbone.model.encode_text(backbone.tokenizer(
            [f"a photo of a {c}." for c in CLASSES])), dim=-1)
        torch.testing.assert_close(model.prompts("positive"), expected, atol=1e-5, rtol=1e-5)


def test_every_family_adapts_and_its_artifact_reloads(family, images, tmp_path):
    name, backbone = family
    phase1 = {"epochs": 1, "batch_size": 4, "vpt_tokens": 2}
    if name == "short-context":  # the default phrase fits; 16 random tokens do not
        phase1["context_tokens"] = 16
    config = CoFTConfig.from_dict({"pseudo_labels": {"top_k": 2}, "phase1": phase1,
                                   "phase2": {"epochs": 1, "batch_size": 4}, "eval_batch_size": 8})
    result = adapt(images, CLASSES, method="coft+", backbone=backbone, config=config)
    assert result.predictions.probabilities.shape == (8, 3)
    loaded = Classifier.load(result.classifier.save(tmp_path / name), device="cpu")
    torch.testing.assert_close(loaded.predict(images).probabilities, result.classifier.predict(images).probabilities)
    used = result.metrics.get("phase1_context_tokens")
    if name == "short-context":  # 12 tokens: start, end and "blue thing." leave 7 of the 16 asked for
        assert used == {"requested": 16, "used": 7}
    else:
        assert used is None


def _fresh_phase2_model(backbone):
    """A Phase II classifier of this family: the fresh tower and a head from random class embeddings."""
    torch.manual_seed(0)
    return fresh_classifier(backbone, F.normalize(torch.randn(3, backbone.model_cfg["embed_dim"]), dim=-1),
                            Phase2Config())


def _fine_tune(model, backbone, images, labels, clean, config) -> list[dict]:
    """Phase II's training of `model` on the family's images, seeded alike for every call."""
    torch.manual_seed(0)
    return fine_tune(model, backbone, cached_images(images, backbone.preprocess_cfg, backbone.device), labels, clean,
                     config, seed=0)


ALL_CLASSES, ALL_CLEAN = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.ones(8, dtype=torch.bool)


def test_a_phase2_batch_with_one_clean_sample_skips_its_ce_for_every_tower(family, images):
    """A BatchNorm tower (timm's ResNet) cannot train on one sample: such a batch's CE is skipped."""
    _, backbone = family
    model = _fresh_phase2_model(backbone)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    clean = torch.zeros(8, dtype=torch.bool)
    clean[3] = True  # batches of 4: one clean sample in one batch, none in the other
    history = _fine_tune(model, backbone, images, torch.zeros(8, dtype=torch.long), clean,
                         Phase2Config(epochs=1, batch_size=4))
    assert history == [{"epoch": 1, "ce": None}]
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


def test_a_vision_tower_rebuilt_from_its_config_takes_the_models_weights(family):
    """Classifier.load rebuilds towers without their text tower (coft.openclip.build_vision_tower)."""
    _, backbone = family
    tower = build_vision_tower(backbone.model_cfg)
    tower.load_state_dict(backbone.model.visual.state_dict(), strict=True)


def test_every_tower_has_depths_for_layer_decay_and_phase2_trains_with_it(family, images):
    """phase2.layer_decay numbers each weight by depth: the stem at 0, the pooling and projection deepest."""
    _, backbone = family
    visual = backbone.model.visual
    depths, top = vision_depths(visual)
    assert set(depths) == {name for name, _ in visual.named_parameters()}
    assert min(depths.values()) == 0 and max(depths.values()) == top and len(set(depths.values())) >= 4
    first = next(name for name, _ in visual.named_parameters())  # every tower's first weight is its stem's
    assert depths[first] == 0
    history = _fine_tune(_fresh_phase2_model(backbone), backbone, images, ALL_CLASSES, ALL_CLEAN,
                         Phase2Config(epochs=1, batch_size=4, layer_decay=0.5))
    assert history[0]["ce"] is not None


def test_phase2_swa_averages_every_towers_weights_and_buffers(family, images):
    """phase2.swa_fraction on each tower family, BatchNorm's running statistics included."""
    _, backbone = family
    trained = {}
    for fraction in (0.0, 0.5):
        model = _fresh_phase2_model(backbone)
        _fine_tune(model, backbone, images, ALL_CLASSES, ALL_CLEAN,
                   Phase2Config(epochs=2, batch_size=4, swa_fraction=fraction))
        trained[fraction] = model.state_dict()
    assert all(torch.isfinite(value).all() for value in trained[0.5].values() if value.is_floating_point())
    assert any(not torch.equal(trained[0.5][key], trained[0.0][key]) for key in trained[0.0])

"""Every job says whether each trained model fitted its own training set (coft.convergence)."""

from __future__ import annotations

import pytest
import torch

from coft.config import CoFTConfig
from coft.convergence import MIN_AGREEMENT, fit
from coft.pipeline import adapt

CLASSES = ["red square", "green circle", "blue thing"]
TINY = {"pseudo_labels": {"top_k": 2}, "phase1": {"epochs": 1, "batch_size": 4, "context_tokens": 4, "vpt_tokens": 2},
        "phase2": {"epochs": 1, "batch_size": 4}, "eval_batch_size": 8, "coft_plus": {"rounds": 2}}


def test_fit_compares_predictions_with_the_training_labels_and_warns_below_the_threshold():
    history = [{"epoch": 1, "l1": 0.9}, {"epoch": 2, "l1": 0.1}]
    good = fit("phase1-model1", torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 2]), history)
    assert good.agreement == 1.0 and good.warning() is None
    assert good.as_metrics() == {"agreement": 1.0, "images": 4, "first_loss": {"l1": 0.9}, "final_loss": {"l1": 0.1},
                                 "threshold": 0.9}
    poor = fit("phase2-model2", torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 1, 2, 1, 2]), [{"epoch": 3, "ce": 2.0}])
    assert poor.agreement == pytest.approx(0.6) and poor.threshold == MIN_AGREEMENT["phase2"]
    warning = poor.warning()
    assert warning["code"] == "did-not-fit" and warning["stage"] == "phase2-model2"
    assert "60%" in warning["message"] and "80%" in warning["message"]
    assert fit("phase1-model1", torch.tensor([]), torch.tensor([]), []).warning() is None  # nothing to fit


def test_every_trained_model_of_a_job_reports_its_fit(tiny_backbone, tiny_images):
    result = adapt(tiny_images, CLASSES, method="coft+", backbone=tiny_backbone, config=CoFTConfig.from_dict(TINY))
    fits = result.metrics["fit"]
    assert set(fits) == {"phase1-model1", "phase1-model1-round2", "phase1-model2", "phase1-model2-round2",
                         "phase2-model1", "phase2-model2"}
    assert fits["phase1-model1"]["images"] == result.metrics["s_star_size"]
    for i in (1, 2):
        clean = round(result.metrics[f"clean_fraction_model{i}"] * len(tiny_images))
        assert fits[f"phase2-model{i}"]["images"] == clean
        for key, epoch in (("first_loss", 0), ("final_loss", -1)):
            assert fits[f"phase2-model{i}"][key] == {
                k: v for k, v in result.metrics[f"phase2_model{i}_losses"][epoch].items() if k != "epoch"}
    assert all(0.0 <= f["agreement"] <= 1.0 for f in fits.values())
    warned = {w["stage"] for w in result.metrics.get("warnings", [])}
    assert warned == {stage for stage, f in fits.items() if f["images"] and f["agreement"] < f["threshold"]}


def test_an_untrained_phase1_is_reported_as_not_fitted(tiny_backbone, tiny_images):
    """Random contexts and no step: the prompt model's labels are not S*'s, and the job says so."""
    config = CoFTConfig.from_dict({**TINY, "phase1": {**TINY["phase1"], "epochs": 0, "context_init_std": 1.0}})
    result = adapt(tiny_images, CLASSES, method="coft", backbone=tiny_backbone, config=config)
    fits = result.metrics["fit"]
    assert fits["phase1-model1"]["agreement"] < 0.9
    assert "phase1-model1" in {w["stage"] for w in result.metrics["warnings"]}


def test_phase1_fits_s_star_within_the_default_budget_on_a_proxy_task():
    """The default Phase I schedule (20 epochs: 200 steps on this task's S* of 300) fits its pseudo-labels:
    at least 95% of S* gets back the label it was trained on, for both models, and no fit warning."""
    from coft.backbone import load_backbone
    from coft.proxy.tasks import load_task

    task = load_task("dev-digits-segment-cast", num_test=0)  # 1,000 unlabeled images: S* of 10 x 0.3 x 100
    # Digits: no mirroring (as for every digits task here); Phase I and its fit are what is measured.
    config = CoFTConfig.from_dict({"phase1": {"hflip": False}, "phase2": {"epochs": 0}})
    result = adapt(task.train_images, task.class_names, method="coft", backbone=load_backbone("proxy"),
                   config=config)
    fits = result.metrics["fit"]
    for model in ("phase1-model1", "phase1-model2"):
        assert fits[model]["images"] == result.metrics["s_star_size"] == 300
        assert fits[model]["agreement"] >= 0.95, fits[model]
    assert not [w for w in result.metrics.get("warnings", []) if w["stage"].startswith("phase1")]

"""The small units a run is made of: checkpoints, seeding, the stage schedule, quality signals."""

from __future__ import annotations

import pytest
import torch

from coft import seeding
from coft.checkpoints import Checkpoints, run_fingerprint
from coft.classifier import Predictions
from coft.config import CoFTConfig
from coft.quality import accuracy, quality_signals
from coft.schedule import round_top_k, rounds, stage_costs
from coft.stages import Filtered, FineTuned, ZeroShot


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_holds_a_typed_result_and_only_its_run_resumes_it(tmp_path):
    fingerprint = run_fingerprint(method="coft", images="abc")
    checkpoints = Checkpoints(tmp_path, fingerprint)
    result = FineTuned({"w": torch.arange(3.0)}, [{"epoch": 1, "ce": 0.5}])
    assert checkpoints.load("phase2-model1", FineTuned) is None
    checkpoints.save("phase2-model1", result)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "images-x.u8").write_bytes(b"rows")
    again = Checkpoints(tmp_path, fingerprint).load("phase2-model1", FineTuned)
    assert isinstance(again, FineTuned) and torch.equal(again.state["w"], result.state["w"])
    assert again.history == result.history
    assert not list(tmp_path.glob("*.tmp"))  # written under another name, then renamed
    # Another run (other images) in the same directory: nothing of the first is resumed, or kept.
    other = Checkpoints(tmp_path, run_fingerprint(method="coft", images="xyz"))
    assert other.load("phase2-model1", FineTuned) is None and not (tmp_path / "images").exists()


def test_run_fingerprints_tell_inputs_apart():
    assert run_fingerprint(a=1, b=[1, 2]) == run_fingerprint(b=[1, 2], a=1)
    assert run_fingerprint(a=1) != run_fingerprint(a=2)


# --------------------------------------------------------------------------- seeding


def test_every_model_round_and_phase_has_a_seed_of_its_own():
    seeds = {seeding.model_seed(0, 1), seeding.model_seed(0, 2), seeding.round_seed(0, 1, 2),
             seeding.round_seed(0, 2, 2), seeding.phase2_seed(0, 1), seeding.phase2_seed(0, 2), seeding.model_seed(1, 1)}
    assert len(seeds) == 7
    assert seeding.round_seed(3, 2, 1) == seeding.model_seed(3, 2)  # round 1 is Phase I itself


def test_stage_randomness_is_reproducible_and_leaves_the_caller_alone():
    torch.manual_seed(123)
    outside = torch.rand(1)
    torch.manual_seed(123)
    with seeding.stage_randomness(0, 4):
        first = torch.rand(3)
    assert torch.equal(torch.rand(1), outside)  # the caller's stream goes on as if nothing happened
    with seeding.stage_randomness(0, 4):
        assert torch.equal(torch.rand(3), first)
    with seeding.stage_randomness(0, 5):
        assert not torch.equal(torch.rand(3), first)


# --------------------------------------------------------------------------- running a stage


def test_a_stage_runs_once_under_its_own_seed_and_an_interrupted_run_loads_it(tmp_path):
    from coft.progress import ProgressTracker
    from coft.stage_runner import StageRunner

    costs = {"decode": 1.0, "phase2-model1": 1.0}
    calls, events = [], []

    def runner() -> StageRunner:
        checkpoints = Checkpoints(tmp_path, run_fingerprint(method="coft", images="abc"))
        return StageRunner(ProgressTracker(events.append, costs), seed=3, checkpoints=checkpoints)

    def train(report) -> FineTuned:
        calls.append(torch.rand(2))
        report(0.5, "half")
        return FineTuned({"w": calls[-1]}, [])

    first = runner().run("phase2-model1", train, FineTuned)
    with seeding.stage_randomness(3, 1):  # the stage's position in the run, under the run's seed
        assert torch.equal(calls[0], torch.rand(2))
    assert [(e.stage, e.message) for e in events] == [("phase2-model1", "starting"), ("phase2-model1", "half"),
                                                     ("phase2-model1", "done")]
    events.clear()
    again = runner().run("phase2-model1", train, FineTuned)  # a new attempt, same checkpoints
    assert len(calls) == 1 and torch.equal(again.state["w"], first.state["w"])
    assert [e.resumed for e in events] == [True]
    runner().run("decode", lambda report: calls.append(None))  # not checkpointed: runs every time
    runner().run("decode", lambda report: calls.append(None))
    assert len(calls) == 3


# --------------------------------------------------------------------------- a run's images


def test_a_runs_images_are_u_then_the_shots_and_zero_shot_refuses_shots(tiny_images):
    from coft.run_images import LabelledImages, RunImages

    shots = LabelledImages(tiny_images[:2], torch.tensor([1, 0]))
    images = RunImages(tiny_images[2:6], labelled_shots=shots)
    assert (images.unlabeled, len(images), images.shot_labels.tolist()) == (4, 6, [1, 0])
    assert images.train[4].tobytes() == tiny_images[0].tobytes()
    assert images.fingerprint != RunImages(tiny_images[2:6]).fingerprint  # the shots are part of the input
    with pytest.raises(ValueError, match="need a method that trains"):
        RunImages(tiny_images[2:6], labelled_shots=shots, trains=False)


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("method, expected", [
    ("zero-shot", ["decode", "zero-shot", "finish"]),
    ("coft", ["decode", "zero-shot", "phase1-model1", "phase1-model2", "filter", "phase2-model1", "phase2-model2",
              "finish"]),
    ("coft+", ["decode", "zero-shot", "phase1-model1", "phase1-model1-round2", "phase1-model2", "phase1-model2-round2",
               "filter", "phase2-model1", "phase2-model2", "finish"]),
])
def test_the_schedule_lists_a_runs_stages_in_order_with_positive_costs(method, expected):
    costs = stage_costs(method, CoFTConfig(), images=1000, classes=10)
    assert list(costs) == expected and all(cost > 0 for cost in costs.values())


def test_the_schedule_follows_the_config():
    config = CoFTConfig.from_dict({"coft_plus": {"rounds": 3, "round_top_k": "grow"}})
    assert rounds(config, "coft+") == 3 and rounds(config, "coft") == 1
    assert [round_top_k(config, r, 400, 10) for r in (1, 2, 3)] == [16, 32, 48]
    constant = CoFTConfig.from_dict({"coft_plus": {"round_top_k": "constant"}})
    assert round_top_k(constant, 3, 400, 10) == 16
    spec = stage_costs("coft+", CoFTConfig(), 1000, 10)["phase2-model1"]
    shared = stage_costs("coft+", CoFTConfig.from_dict({"coft_plus": {"shared_view": "ce"}}), 1000, 10)
    assert shared["phase2-model1"] < spec  # one forward pass with gradient instead of two
    assert "phase1-model1-round3" in stage_costs("coft+", config, 1000, 10)


@pytest.mark.parametrize("unlabeled, classes, expected", [
    (1000, 10, 30),  # 0.3 x 100 per class
    (600, 10, 18),
    (400, 10, 16),  # 0.3 x 40 = 12: top_k is the floor
    (5, 10, 16),
])
def test_k_as_a_share_of_the_images_per_class_has_top_k_as_its_floor(unlabeled, classes, expected):
    config = CoFTConfig.from_dict({"pseudo_labels": {"top_k_share": 0.3}})
    assert round_top_k(config, 1, unlabeled, classes) == expected
    spec = CoFTConfig.from_dict({"pseudo_labels": {"top_k_share": None}})
    assert spec.pseudo_labels.images_per_class(unlabeled, classes) == 16  # the spec's fixed K
    grown = CoFTConfig.from_dict({"pseudo_labels": {"top_k_share": 0.3}, "coft_plus": {"round_top_k": "grow"}})
    assert round_top_k(grown, 2, unlabeled, classes) == 2 * expected
    # Phase I's expected cost follows S*'s size, so progress and ETA stay honest.
    cost = stage_costs("coft", config, unlabeled, classes)["phase1-model1"]
    assert cost == 3.0 * config.phase1.epochs * min(unlabeled, classes * expected)


@pytest.mark.parametrize("share", [0, -0.1, 1.5, "0.3"])
def test_a_share_outside_0_to_1_is_refused_naming_the_field(share):
    with pytest.raises(ValueError, match="pseudo_labels.top_k_share"):
        CoFTConfig.from_dict({"pseudo_labels": {"top_k_share": share}})


# --------------------------------------------------------------------------- quality signals


def test_quality_signals_by_hand():
    classes = ["a", "b", "c"]
    zero_shot = ZeroShot(torch.eye(3), labels=torch.tensor([0, 0, 1, 2, 1]), confidence=torch.tensor([.9, .8, .7, .6, .5]),
                         s_star_indices=torch.tensor([0, 2, 3]), s_star_labels=torch.tensor([0, 1, 2]),
                         prompt_source="template")
    predictions = Predictions(classes, torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]))
    filtered = Filtered(labels=[torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 0])],
                        clean=[torch.tensor([True, True, False, False, True]), torch.tensor([True] * 5)],
                        p_clean=[torch.full((5,), 0.6), torch.full((5,), 0.8)], confidence=[torch.ones(5)] * 2)
    signals = quality_signals(classes, 4, zero_shot, predictions, filtered, shots=1)
    assert signals["zero_shot_class_counts"] == {"a": 2, "b": 1, "c": 1}  # U only: the shot is left out
    assert signals["final_class_counts"] == {"a": 1, "b": 2, "c": 1}
    assert signals["s_star_size"] == 3 and signals["s_star_class_counts"] == {"a": 1, "b": 1, "c": 1}
    assert signals["agreement"] == pytest.approx(0.8)
    assert signals["clean_fraction_model1"] == pytest.approx(0.6) and signals["clean_fraction_model2"] == 1.0
    assert signals["mean_p_clean_model2"] == pytest.approx(0.8)
    assert signals["prediction_entropy"] == pytest.approx(0.0, abs=1e-9)  # one-hot predictions
    assert signals["zero_shot_mean_confidence"] == pytest.approx(0.75) and signals["labelled_shots"] == 1
    assert "prompt_fallback_reason" not in signals
    assert accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)

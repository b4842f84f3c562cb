"""The `coft` command line, end to end on the tiny random CLIP of conftest.py."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from coft.classifier import METADATA_FILE, Classifier
from coft.cli import app

from conftest import draw_image

runner = CliRunner()
CLASSES = "red square,green circle,blue thing"
TINY_CONFIG = {"pseudo_labels": {"top_k": 2}, "phase1": {"epochs": 1, "batch_size": 4, "context_tokens": 4,
                                                         "vpt_tokens": 2},
               "phase2": {"epochs": 1, "batch_size": 4}, "eval_batch_size": 8}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six images, some in a sub-folder, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i in range(6):
        draw_image(i).save(root / ("sub" if i % 3 == 0 else ".") / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def said(result) -> str:
    """What the command printed, with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_adapt_zero_shot_then_predict(image_dir, tiny_model_id, tmp_path):
    out = tmp_path / "classifier"
    result = invoke("adapt", "--images", image_dir, "--classes", CLASSES, "--method", "zero-shot",
                    "--model", tiny_model_id, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["class_names"] == CLASSES.split(",") and metadata["method"] == "zero-shot"
    assert "skipped 1 unusable file" in said(result)  # notes.txt

    preds = tmp_path / "out" / "preds.csv"
    result = invoke("predict", "--classifier", out, "--images", image_dir, "--out", preds, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with preds.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "label", "probability"]
    assert sorted(row[0] for row in rows[1:]) == sorted(
        ["img1.png", "img2.png", "img4.png", "img5.png", "sub/img0.png", "sub/img3.png"])
    classes = set(CLASSES.split(","))
    for _, label, probability in rows[1:]:
        assert label in classes
        assert 1 / len(classes) <= float(probability) <= 1.0
    # the CSV says what the artifact says
    from coft.data import open_images

    image_set = open_images(image_dir)
    predictions = Classifier.load(out, device="cpu").predict(image_set)
    assert [row[1] for row in rows[1:]] == predictions.labels
    assert [row[0] for row in rows[1:]] == image_set.names


def test_adapt_coft_with_a_config_file(image_dir, tiny_model_id, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_CONFIG, "seed": 3}))
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("red square\n\ngreen circle\nblue thing\n")
    out = tmp_path / "classifier"
    result = invoke("adapt", "--images", image_dir, "--classes-file", classes_file, "--model", tiny_model_id,
                    "--config", config, "--device", "cpu", "--out", out, "--checkpoint-dir", tmp_path / "ckpt")
    assert result.exit_code == 0, result.output
    assert "s_star_size" in said(result) and "agreement" in said(result)
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["method"] == "coft" and metadata["num_members"] == 2
    assert metadata["class_names"] == ["red square", "green circle", "blue thing"]
    assert metadata["config"]["phase1"]["context_tokens"] == 4 and metadata["config"]["phase2"]["epochs"] == 1
    assert metadata["config"]["seed"] == 3  # the file's seed, since --seed was not given
    assert "clean_fraction_model1" in metadata["metrics"]

    result = invoke("adapt", "--images", image_dir, "--classes-file", classes_file, "--model", tiny_model_id,
                    "--method", "zero-shot", "--config", config, "--seed", "5", "--template", "a {} shape",
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["config"]["seed"] == 5 and metadata["config"]["pseudo_labels"]["template"] == "a {} shape"


@pytest.mark.parametrize("class_args", [
    ["--classes", "a,b", "--classes-file", "CLASSES_FILE"],
    [],
])
def test_adapt_needs_exactly_one_class_source(class_args, image_dir, tiny_model_id, tmp_path):
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("a\nb\n")
    args = [str(classes_file) if a == "CLASSES_FILE" else a for a in class_args]
    result = invoke("adapt", "--images", image_dir, *args, "--model", tiny_model_id, "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert "exactly one of --classes or --classes-file" in said(result)
    assert not (tmp_path / "out").exists()


def test_a_folder_without_images_exits_2(image_dir, tiny_model_id, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    result = invoke("adapt", "--images", empty, "--classes", "a,b", "--model", tiny_model_id, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "no usable images" in said(result)
    classifier = tmp_path / "classifier"
    result = invoke("adapt", "--images", image_dir, "--classes", "a,b", "--method", "zero-shot",
                    "--model", tiny_model_id, "--device", "cpu", "--out", classifier)
    assert result.exit_code == 0, result.output
    result = invoke("predict", "--classifier", classifier, "--images", empty, "--out", tmp_path / "p.csv")
    assert result.exit_code == 2
    assert "no usable images" in said(result)
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--classes", "cat"], "at least two class names"),
    (["--classes", "cat,Cat"], "distinct"),
    (["--classes", "a,b", "--method", "coft+++"], "choose one of"),
    (["--classes", "a,b", "--template", "no placeholder"], "{}"),
])
def test_adapt_rejects_bad_arguments(args, message, image_dir, tiny_model_id, tmp_path):
    result = invoke("adapt", "--images", image_dir, *args, "--model", tiny_model_id, "--device", "cpu",
                    "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in said(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ['{"phase1": {"epochs": "many"}}', '{"nope": 1}', "{not json", "[1, 2]"])
def test_adapt_rejects_a_bad_config_file(content, image_dir, tiny_model_id, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(content)
    result = invoke("adapt", "--images", image_dir, "--classes", "a,b", "--model", tiny_model_id,
                    "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "--config" in said(result)


def test_predict_with_something_that_is_not_a_classifier(image_dir, tmp_path):
    result = invoke("predict", "--classifier", tmp_path, "--images", image_dir, "--out", tmp_path / "p.csv")
    assert result.exit_code == 2
    assert "not a coft classifier artifact" in said(result)
    assert not (tmp_path / "p.csv").exists()


def test_adapt_coft_plus_with_descriptions_and_shots(image_dir, tiny_model_id, tmp_path, monkeypatch):
    monkeypatch.setenv("COFT_LLM_BASE_URL", "http://127.0.0.1:9/v1")  # configured, but user descriptions win
    monkeypatch.setenv("COFT_LLM_MODEL", "any")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_CONFIG, "coft_plus": {"rounds": 2}}))
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({name: [f"a drawing of a {name}."] for name in CLASSES.split(",")}))
    shots = tmp_path / "shots"
    for i, name in enumerate(CLASSES.split(",")):
        (shots / name).mkdir(parents=True)
        draw_image(30 + i).save(shots / name / "shot.png")
    out = tmp_path / "classifier"
    result = invoke("adapt", "--images", image_dir, "--classes", CLASSES, "--model", tiny_model_id, "--method",
                    "coft+", "--config", config, "--descriptions", descriptions, "--shots", shots, "--device", "cpu",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "prompt_source: user" in said(result) and "labelled_shots: 3" in said(result)
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["method"] == "coft+" and metadata["metrics"]["prompt_source"] == "user"
    assert "phase1_model2_round2_losses" in metadata["metrics"]

    # the LLM endpoint is down: the run falls back to the template ensemble, and says so
    result = invoke("adapt", "--images", image_dir, "--classes", CLASSES, "--model", tiny_model_id, "--method",
                    "coft+", "--config", config, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert "prompt_source: template-ensemble" in said(result) and "ConnectError" in said(result)

    descriptions.write_text(json.dumps({"red square": ["a red square."]}))
    result = invoke("adapt", "--images", image_dir, "--classes", CLASSES, "--model", tiny_model_id, "--method",
                    "coft+", "--descriptions", descriptions, "--device", "cpu", "--out", out)
    assert result.exit_code == 2 and "missing classes" in said(result)

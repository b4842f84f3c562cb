"""benchmarks/accuracy.py on a dataset on disk (`--data`): the same task as the proxy it was exported from."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from coft.proxy.tasks import export_task, load_task

SIZES = {"num_train": 40, "num_test": 30}


def _load_accuracy_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


accuracy = _load_accuracy_script()


def _pixels(images, labels, class_names) -> Counter:
    return Counter((class_names[label], image.tobytes()) for image, label in zip(images, labels))


@pytest.fixture(scope="module")
def proxy_task():
    return load_task("digits-handwritten", **SIZES)


@pytest.fixture(scope="module")
def exported(proxy_task, tmp_path_factory) -> Path:
    """The layout `coft.proxy.tasks export` writes: unlabeled/, test/<class>/, classes.txt."""
    return export_task(proxy_task, tmp_path_factory.mktemp("data") / "handwritten")


@pytest.fixture(scope="module")
def labelled(proxy_task, exported, tmp_path_factory) -> Path:
    """The same task with a labelled train split and no classes.txt: names come from the folders."""
    root = tmp_path_factory.mktemp("labelled") / "handwritten-labelled"
    shutil.copytree(exported / "test", root / "test")
    for i, (image, label) in enumerate(zip(proxy_task.train_images, proxy_task.train_labels)):
        folder = root / "train" / proxy_task.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.png")
    return root


def test_an_exported_task_reads_back_as_the_same_images_labels_and_classes(proxy_task, exported, labelled):
    task = accuracy.folder_task(exported)
    assert task.name == "handwritten" and task.class_names == proxy_task.class_names
    assert task.train_labels is None and len(task.train_images) == SIZES["num_train"]
    assert _pixels(task.test_images, task.test_labels, task.class_names) == \
        _pixels(proxy_task.test_images, proxy_task.test_labels, proxy_task.class_names)

    task = accuracy.folder_task(labelled, flip_invariant=False)
    assert sorted(task.class_names) == task.class_names == sorted(proxy_task.class_names)
    assert _pixels(task.train_images, task.train_labels, task.class_names) == \
        _pixels(proxy_task.train_images, proxy_task.train_labels, proxy_task.class_names)
    assert not task.flip_invariant


def test_a_folder_scores_as_the_proxy_task_it_came_from(exported, tmp_path, capsys):
    accuracy.main(["--data", str(exported), "--methods", "zero-shot", "--json", str(tmp_path / "folder.json")])
    assert "| method | labels | handwritten | **average** |" in capsys.readouterr().out
    accuracy.main(["--tasks", "digits-handwritten", "--num-train", str(SIZES["num_train"]), "--num-test",
                   str(SIZES["num_test"]), "--methods", "zero-shot", "--json", str(tmp_path / "proxy.json")])
    [folder_run] = json.loads((tmp_path / "folder.json").read_text())
    [proxy_run] = json.loads((tmp_path / "proxy.json").read_text())
    assert folder_run["task"] == "handwritten" and proxy_run["task"] == "digits-handwritten"
    assert 0.0 < proxy_run["accuracy"] < 1.0
    assert folder_run["accuracy"] == pytest.approx(proxy_run["accuracy"], abs=1e-6)


def test_few_shot_rows_need_a_labelled_train_split(exported):
    with pytest.raises(SystemExit, match="no train/<class>/ folders"):
        accuracy.main(["--data", str(exported), "--methods", "zero-shot", "coop-1"])


def test_a_folder_without_a_train_split_is_refused(exported, tmp_path):
    shutil.copytree(exported / "test", tmp_path / "test-only" / "test")
    with pytest.raises(SystemExit, match="neither train/<class>/ nor unlabeled/"):
        accuracy.folder_task(tmp_path / "test-only")

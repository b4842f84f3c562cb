"""ONNX export: the ensemble and each member run in onnxruntime and match torch."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from coft.classifier import Classifier
from coft.cli import app
from coft.export import export_onnx


@pytest.fixture(scope="module")
def two_members(tiny_backbone):
    """A zero-shot member and a perturbed copy: an ensemble whose members disagree."""
    from coft.classifier import zero_shot_classifier

    first = zero_shot_classifier(tiny_backbone, ["red square", "green circle", "blue thing"]).members[0]
    second = copy.deepcopy(first)
    with torch.no_grad():
        second.head.weight.add_(torch.randn_like(second.head.weight, generator=torch.Generator().manual_seed(0)))
    return Classifier([first, second], ["red square", "green circle", "blue thing"], tiny_backbone.model_cfg,
                      tiny_backbone.preprocess_cfg, {"method": "test"})


def test_every_file_matches_torch_within_1e4_at_any_batch_size(two_members, tiny_images, tmp_path):
    paths = export_onnx(two_members, tmp_path)
    assert [p.name for p in paths] == ["ensemble.onnx", "member-0.onnx", "member-1.onnx"]
    transform = two_members.transform()
    pixels = torch.stack([transform(image) for image in tiny_images])  # 8 images; exported at batch 2
    expected = {"ensemble": two_members(pixels), "member-0": two_members.member(0)(pixels),
                "member-1": two_members.member(1)(pixels)}
    assert not torch.allclose(expected["member-0"], expected["member-1"], atol=1e-3)
    for path in paths:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        [got] = session.run(["probabilities"], {"pixels": pixels.numpy()})
        np.testing.assert_allclose(got, expected[path.stem].detach().numpy(), atol=1e-4)
        metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert json.loads(metadata["preprocessing"]) == two_members.preprocess_cfg
        assert json.loads(metadata["class_names"]) == two_members.class_names
        assert json.loads(metadata["coft"])["member"] == path.stem


def test_coft_export_writes_the_files(two_members, tmp_path):
    from typer.testing import CliRunner

    two_members.save(tmp_path / "artifact")
    result = CliRunner().invoke(app, ["export", "--classifier", str(tmp_path / "artifact"), "--format", "onnx",
                                      "--out", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["ensemble.onnx", "member-0.onnx", "member-1.onnx"]
    refused = CliRunner().invoke(app, ["export", "--classifier", str(tmp_path / "artifact"), "--format", "tflite",
                                       "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2

"""A classifier as ONNX: the vision tower and head of the ensemble and of each member.

    coft export --classifier my-classifier/ --format onnx --out my-classifier-onnx/

writes `ensemble.onnx` and `member-{i}.onnx`: input `pixels` [batch, 3, H, W] float32 (the test-time
transform applied: resize, centre crop, normalise, as `preprocessing` in each file's metadata says),
output `probabilities` [batch, classes]. Each file's metadata also holds the class names and the
classifier's metadata (method, backbone). Exported with torch.onnx's dynamo exporter; the batch
dimension is dynamic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from coft.classifier import Classifier

INPUT, OUTPUT = "pixels", "probabilities"


def export_onnx(classifier: Classifier, out_dir: str | os.PathLike) -> list[Path]:
    """Write the ensemble and every member as ONNX files into out_dir; returns their paths."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpu = classifier.to("cpu").eval()
    size = cpu.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    example = torch.zeros(2, 3, height, width)
    models = {"ensemble": cpu, **{f"member-{i}": cpu.member(i) for i in range(len(cpu.members))}}
    written = []
    for name, model in models.items():
        path = out / f"{name}.onnx"
        program = torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
        document = program.model_proto
        metadata = {"preprocessing": json.dumps(cpu.preprocess_cfg), "class_names": json.dumps(cpu.class_names),
                    "coft": json.dumps({**cpu.metadata, "member": name}, default=str)}
        for key, value in metadata.items():
            document.metadata_props.add(key=key, value=value)
        onnx.save(document, str(path))
        written.append(path)
    return written

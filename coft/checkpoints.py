"""Checkpoints: each stage's result as a file `<stage>.pt`, so an interrupted run resumes where it
stopped, and only the same run resumes it.

A result is a dataclass of tensors, numbers, strings and lists (coft.stages); it is stored as its
fields and loaded back with torch's safe loader (weights_only). The directory also holds the run's
decoded-image caches (`images/`, coft.image_cache). A directory holding another run's files (other
images, config, backbone or format) is emptied on arrival.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch

FORMAT = 3  # what a checkpoint holds; a checkpoint of another format belongs to another run
Result = TypeVar("Result")


def run_fingerprint(**inputs: Any) -> str:
    """Identifies a run by everything its stages depend on (JSON-able values)."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **inputs}, sort_keys=True).encode()).hexdigest()


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / "run.json"
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            for stale in self.directory.glob("*.pt"):
                stale.unlink()
            shutil.rmtree(self.images, ignore_errors=True)
        marker.write_text(json.dumps({"fingerprint": fingerprint}))

    @property
    def images(self) -> Path:
        """Where the run's decoded-image caches live."""
        return self.directory / "images"

    def load(self, stage: str, kind: type[Result]) -> Result | None:
        path = self.directory / f"{stage}.pt"
        if not path.exists():
            return None
        return kind(**torch.load(path, map_location="cpu", weights_only=True))

    def save(self, stage: str, result: Any) -> None:
        """Written to a temporary name and renamed: a checkpoint is whole or absent."""
        path = self.directory / f"{stage}.pt"
        temporary = path.with_suffix(".pt.tmp")
        torch.save({field.name: getattr(result, field.name) for field in dataclasses.fields(result)}, temporary)
        os.replace(temporary, path)

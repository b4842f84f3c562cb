"""coft: adapt a CLIP model to your classes without labels (CoFT and CoFT+).

The public API, in one place; the service (app/, worker/) uses nothing else:

    images = coft.open_images("photos/")                      # a folder or an archive, checked
    result = coft.adapt(images, ["cat", "dog"], method="coft", progress=print)
    result.classifier.save("my-classifier")
    coft.Classifier.load("my-classifier").predict(coft.open_images("new/")).labels

Names load on first use, so `import coft` stays cheap (torch and open_clip come with the first
model-facing name).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # running a job
    "adapt": "coft.pipeline", "AdaptResult": "coft.pipeline", "LabelledImages": "coft.run_images",
    "METHODS": "coft.pipeline", "check_job": "coft.pipeline",
    "CoFTConfig": "coft.config", "DEFAULT_TEMPLATE": "coft.config", "check_template": "coft.config",
    "Progress": "coft.progress", "ProgressCallback": "coft.progress",
    # images in, with the same checks for uploads, folders and predict requests
    "open_images": "coft.data", "open_labelled_images": "coft.data", "decode_image": "coft.data",
    "ImageSet": "coft.data", "ArchiveIndex": "coft.data", "LabelledImageSet": "coft.data", "RejectedFile": "coft.data",
    "DataLimits": "coft.data", "DataError": "coft.data", "normalise_class_name": "coft.data",
    "check_class_names": "coft.data", "MAX_CLASSES": "coft.data",
    # the artifact every method writes
    "Classifier": "coft.classifier", "Predictions": "coft.classifier", "zero_shot_classifier": "coft.classifier",
    "export_onnx": "coft.export",
    # backbones and class descriptions
    "load_backbone": "coft.backbone", "Backbone": "coft.backbone", "PROXY_MODEL": "coft.backbone",
    "proxy_weights_installed": "coft.backbone",
    "LLMEndpoint": "coft.descriptions", "DescriptionError": "coft.descriptions",
    "load_descriptions": "coft.descriptions", "validate_descriptions": "coft.descriptions",
    # the shipped proxy tasks (demos, benchmarks): public name -> (module, its name there)
    "load_proxy_task": ("coft.proxy.tasks", "load_task"), "PROXY_TASKS": ("coft.proxy.tasks", "TASKS"),
    "ProxyTask": "coft.proxy.tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module 'coft' has no attribute {name!r}")
    module, attribute = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
    from coft.backbone import PROXY_MODEL, Backbone, load_backbone, proxy_weights_installed
    from coft.classifier import Classifier, Predictions, zero_shot_classifier
    from coft.export import export_onnx
    from coft.config import DEFAULT_TEMPLATE, CoFTConfig, check_template
    from coft.data import (MAX_CLASSES, ArchiveIndex, DataError, DataLimits, ImageSet, LabelledImageSet, RejectedFile,
                           check_class_names, decode_image, normalise_class_name, open_images,
                           open_labelled_images)
    from coft.descriptions import DescriptionError, LLMEndpoint, load_descriptions, validate_descriptions
    from coft.pipeline import METHODS, AdaptResult, adapt, check_job
    from coft.run_images import LabelledImages
    from coft.progress import Progress, ProgressCallback
    from coft.proxy.tasks import TASKS as PROXY_TASKS
    from coft.proxy.tasks import ProxyTask
    from coft.proxy.tasks import load_task as load_proxy_task

"""Which backbones a job may name, and what coft.backbone.load_backbone is given for each.

Users never pass paths: `local-dir:/etc/...` or a checkpoint path would let a tenant read the
server's files. They name one of
- `proxy`: the model this project ships (coft/proxy/weights), once its weights are installed;
- a folder of the models directory (COFT_MODELS_DIR) in open_clip's local-dir format, which an
  operator placed there -> `local-dir:<path>`;
- an open_clip architecture with one of its pretrained tags (`ViT-B-16` + `openai`), downloaded
  or found in the cache by open_clip;
- `hf-hub:ORG/REPO`.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.core.errors import Invalid
from app.core.settings import Settings

_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_HF_HUB = re.compile(r"^hf-hub:[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CONFIG_FILE = "open_clip_config.json"


def unknown_model(detail: str) -> Invalid:
    return Invalid("unknown-model", detail, "Unknown model")


def local_models(settings: Settings) -> dict[str, Path]:
    """Folders of the models directory that hold an open_clip config, by name."""
    root = settings.models_dir
    if root is None or not root.is_dir():
        return {}
    return {p.name: p.resolve() for p in sorted(root.iterdir())
            if _FOLDER_NAME.match(p.name) and (p / CONFIG_FILE).is_file()}


def proxy_available() -> bool:
    import coft

    return coft.proxy_weights_installed()


def resolve(settings: Settings, model: str, pretrained: str | None) -> tuple[str, str | None]:
    """(model, pretrained) for coft.backbone.load_backbone, or a 422 unknown-model problem."""
    import open_clip

    if model == "proxy":
        if pretrained:
            raise unknown_model("the proxy model carries its own weights; omit `pretrained`")
        if not proxy_available():
            raise unknown_model("the proxy model's weights are not installed on this server "
                                "(`make pretrain-proxy`); name another model")
        return "proxy", None
    if _FOLDER_NAME.match(model) and model in (found := local_models(settings)):
        if pretrained:
            raise unknown_model(f"{model!r} from the models directory carries its own weights; omit `pretrained`")
        return f"local-dir:{found[model]}", None
    if _HF_HUB.match(model):
        if pretrained:
            raise unknown_model("hf-hub models carry their own weights; omit `pretrained`")
        return model, None
    if model in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise unknown_model(f"{model!r} needs `pretrained`, one of: {', '.join(tags) or '(none known)'}")
        return model, pretrained
    raise unknown_model(f"no model {model!r}: use proxy, a folder of the models directory "
                        f"({', '.join(local_models(settings)) or 'empty'}), an open_clip architecture with a "
                        "pretrained tag, or hf-hub:ORG/REPO")

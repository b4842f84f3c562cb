"""The backbones a job can name without a download: the proxy model and the models directory."""

from __future__ import annotations

from fastapi import APIRouter

from app.core import backbones
from app.api.deps import SettingsDep, TenantDep
from app.api.schemas import ModelOut

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=list[ModelOut])
def list_models(settings: SettingsDep, tenant: TenantDep) -> list[ModelOut]:
    """Open_clip architectures with pretrained tags (`ViT-B-16` + `openai`) work too where weights
    can be downloaded or are cached; they are not listed."""
    found = [ModelOut(name="proxy", kind="proxy")] if backbones.proxy_available() else []
    return found + [ModelOut(name=name, kind="models-dir") for name in backbones.local_models(settings)]

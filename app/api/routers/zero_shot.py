"""Zero-shot CLIP at once, without a job: images + class names + a backbone -> labels."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, UploadFile

from app.core import backbones
from app.api.deps import SettingsDep, TenantDep
from app.api.errors import Problem
from app.api.inference import prediction_items, read_images
from app.api.schemas import PredictResponse
from coft import DEFAULT_TEMPLATE, check_class_names, check_template, zero_shot_classifier

router = APIRouter(prefix="/v1/zero-shot", tags=["zero-shot"])


@router.post("/predict", response_model=PredictResponse)
def zero_shot_predict(
    images: Annotated[list[UploadFile], File(description="one or more images")],
    class_names: Annotated[list[str], Form(description="repeat the field once per class")],
    request: Request, settings: SettingsDep, tenant: TenantDep,
    model: Annotated[str | None, Form(description="default: the service's default model")] = None,
    pretrained: Annotated[str | None, Form()] = None,
    template: Annotated[str, Form()] = DEFAULT_TEMPLATE,
    top_k: Annotated[int, Query(ge=1, le=100)] = 5,
) -> PredictResponse:
    """Classify images by their similarity to "a photo of a {class}." with a CLIP backbone."""
    try:
        names = check_class_names(class_names)
    except ValueError as error:
        raise Problem(422, "invalid-class-names", str(error), "Invalid class names") from None
    try:
        check_template(template)
    except ValueError as error:
        raise Problem(422, "invalid-template", str(error)) from None
    model_id, weights = backbones.resolve(settings, model or settings.default_model, pretrained or None)
    image_set = read_images(images, settings)

    def load():
        from coft import load_backbone

        return load_backbone(model_id, weights, settings.device)

    backbone = request.app.state.backbones.get((model_id, weights), load)
    classifier = zero_shot_classifier(backbone, names, templates=[template], copy_weights=False)
    request.app.state.metrics.predict_batch.labels("zero-shot").observe(len(image_set))
    return PredictResponse(predictions=prediction_items(images, classifier.predict(image_set), top_k))

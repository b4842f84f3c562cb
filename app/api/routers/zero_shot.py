"""Zero-shot CLIP at once, without a job: images + class names + a backbone -> labels."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from app.core import backbones
from app.api.deps import SettingsDep, TenantDep
from app.api.errors import Problem
from app.api import huggingface
from app.api.inference import decode_images, prediction_items, read_images
from app.api.schemas import PredictResponse
from coft import DEFAULT_TEMPLATE, Predictions, check_class_names, check_template, zero_shot_classifier

router = APIRouter(prefix="/v1/zero-shot", tags=["zero-shot"])


@router.post("/predict", response_model=PredictResponse, openapi_extra=huggingface.openapi_extra("PredictResponse"))
async def zero_shot_predict(
    request: Request, settings: SettingsDep, tenant: TenantDep,
    images: Annotated[list[UploadFile] | None, File(description="one or more images")] = None,
    class_names: Annotated[list[str] | None, Form(description="repeat the field once per class")] = None,
    model: Annotated[str | None, Form(description="default: the service's default model")] = None,
    pretrained: Annotated[str | None, Form()] = None,
    template: Annotated[str, Form()] = DEFAULT_TEMPLATE,
    top_k: Annotated[int, Query(ge=1, le=100)] = 5,
):
    """Classify images by their similarity to "a photo of a {class}." with a CLIP backbone: multipart
    (`images`, `class_names`, ...), or the Hugging Face zero-shot-image-classification JSON payload
    (`inputs` base64, `parameters.candidate_labels`, `parameters.hypothesis_template`), answered in its
    shape, `[{label, score}]`, on the service's default model."""
    if huggingface.is_hf_request(request):
        payload = await huggingface.read_hf_request(request)
        if payload.parameters.candidate_labels is None:
            raise Problem(422, "invalid-class-names", "parameters.candidate_labels: give the classes to score",
                          "Invalid class names")
        named = huggingface.hf_images(payload)
        image_set = await anyio.to_thread.run_sync(decode_images, named, settings)
        predictions = await anyio.to_thread.run_sync(
            _predict, request, settings, payload.parameters.candidate_labels, None, None,
            payload.parameters.hypothesis_template or DEFAULT_TEMPLATE, image_set)
        return JSONResponse(huggingface.hf_answer(payload, predictions))
    image_set = await anyio.to_thread.run_sync(read_images, images or [], settings)
    predictions = await anyio.to_thread.run_sync(_predict, request, settings, class_names, model, pretrained,
                                                 template, image_set)
    return PredictResponse(predictions=prediction_items(image_set.names, predictions, top_k))


def _predict(request: Request, settings, class_names: list[str] | None, model: str | None, pretrained: str | None,
             template: str, image_set) -> Predictions:
    try:
        names = check_class_names(class_names or [])
    except ValueError as error:
        raise Problem(422, "invalid-class-names", str(error), "Invalid class names") from None
    try:
        check_template(template)
    except ValueError as error:
        raise Problem(422, "invalid-template", str(error)) from None
    model_id, weights = backbones.resolve(settings, model or settings.default_model, pretrained or None)

    def load():
        from coft import load_backbone

        return load_backbone(model_id, weights, settings.device)

    backbone = request.app.state.backbones.get((model_id, weights), load)
    classifier = zero_shot_classifier(backbone, names, templates=[template], copy_weights=False)
    request.app.state.metrics.predict_batch.labels("zero-shot").observe(len(image_set))
    return classifier.predict(image_set)

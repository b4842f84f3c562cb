"""The Hugging Face inference payloads, accepted by both predict routes next to multipart uploads.

A zero-shot-image-classification request is `{"inputs": "<base64 image>", "parameters":
{"candidate_labels": [...], "hypothesis_template": "This is a photo of {}."}}` and its answer
`[{"label": ..., "score": ...}]`, most probable first. `inputs` may also be a list of images: the answer
is then one such list per image. A classifier's own predict route takes the same payload; there
`candidate_labels` (optional) picks some of the classifier's classes, and their scores are renormalised
over them, as a zero-shot pipeline scores only its candidates.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from coft import Predictions
from app.api.errors import Problem

JSON = "application/json"


class HFParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send pipeline options that do not apply here
    candidate_labels: list[str] | None = Field(None, description="the classes to score")
    hypothesis_template: str | None = Field(None, description='zero-shot only, e.g. "This is a photo of {}."')
    top_k: int | None = Field(None, ge=1, le=1000, description="labels per image (default: all candidates)")


class HFRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str | list[str] = Field(description="a base64-encoded image, or a list of them")
    parameters: HFParameters = HFParameters()


class HFLabelScore(BaseModel):
    label: str
    score: float


def is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == JSON


def is_hf_request(request: Request) -> bool:
    return is_json(request.headers.get("content-type", ""))


async def read_hf_request(request: Request) -> HFRequest:
    return parse_hf_request(await request.body())


def parse_hf_request(body: bytes) -> HFRequest:
    try:
        return HFRequest.model_validate_json(body)
    except ValidationError as error:
        raise Problem(422, "validation-error", "not a Hugging Face inference payload: "
                      + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()),
                      "Invalid request") from None


def hf_images(payload: HFRequest) -> list[tuple[str, bytes]]:
    """(name, bytes) of each base64 input; a 422 for one that is not base64."""
    inputs = [payload.inputs] if isinstance(payload.inputs, str) else payload.inputs
    named = []
    for i, text in enumerate(inputs):
        try:
            named.append((f"inputs[{i}]", base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text,
                                                           validate=True)))
        except (binascii.Error, ValueError):
            raise Problem(422, "invalid-base64", f"inputs[{i}] is not base64-encoded image data") from None
    return named


def hf_answer(payload: HFRequest, predictions: Predictions) -> list:
    """The pipeline's answer shape: [{label, score}] per image, best first (a list of those for a list)."""
    wanted = payload.parameters.candidate_labels
    if wanted is not None:
        names = predictions.class_names
        unknown = [label for label in wanted if label not in names]
        if unknown or not wanted:
            raise Problem(422, "unknown-class", f"candidate_labels must be some of this classifier's classes "
                          f"{names}; unknown: {unknown}", "Unknown class")
        picked = predictions.probabilities[:, [names.index(label) for label in wanted]]
        predictions = Predictions(list(wanted), picked / picked.sum(dim=1, keepdim=True).clamp_min(1e-12))
    ranked = predictions.top_k(payload.parameters.top_k or len(predictions.class_names))
    answers = [[{"label": label, "score": score} for label, score in image] for image in ranked]
    return answers[0] if isinstance(payload.inputs, str) else answers


def component_schemas() -> dict:
    """The payload's schemas, for the OpenAPI document's components."""
    _, top = models_json_schema([(HFRequest, "validation"), (HFLabelScore, "serialization")],
                                ref_template="#/components/schemas/{model}")
    return top["$defs"]


# The multipart body of a route that reads its own (classifier predict: see its comment).
MULTIPART_IMAGES = {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "description": "one or more images (repeat the field)"}}}}}


def openapi_extra(multipart_answer: str, multipart: bool = False) -> dict:
    """The JSON request body next to the multipart one, and the answer each gets, in OpenAPI. With
    `multipart`, the multipart body too, for a route that does not declare it as FastAPI parameters."""
    scores = {"type": "array", "items": {"$ref": "#/components/schemas/HFLabelScore"}}
    content = {JSON: {"schema": {"$ref": "#/components/schemas/HFRequest"}}} | (MULTIPART_IMAGES if multipart else {})
    return {
        "requestBody": {"required": True, "content": content} if multipart else {"content": content},
        "responses": {"200": {"description": "a multipart request gets the service's answer; a Hugging Face "
                                             "payload gets `[{label, score}]`, one list per image for a list",
                              "content": {JSON: {"schema": {"anyOf": [
                                  {"$ref": f"#/components/schemas/{multipart_answer}"}, scores,
                                  {"type": "array", "items": scores}]}}}}},
    }

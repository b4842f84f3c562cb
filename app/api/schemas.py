"""Request and response bodies. Examples here are what /docs shows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.core.crud import JobRequest
from coft import MAX_CLASSES, CoFTConfig, check_class_names, check_template

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class RejectedFileOut(BaseModel):
    path: str
    reason: str


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        "id": "ds_3f9c2a1b7e8d4c5a6b7c", "filename": "birds.zip", "size_bytes": 18223311, "sha256": "9f86d0...",
        "num_images": 1200, "num_rejected": 1, "status": "ready", "num_parts": 0, "error": None,
        "rejected": [{"path": "notes.txt", "reason": "not an image file"}], "created_at": "2026-01-01T12:00:00Z"}]})

    id: str
    filename: str
    size_bytes: int
    sha256: str
    num_images: int
    num_rejected: int
    rejected: list[RejectedFileOut] = Field(description="why files were skipped (the first 1000)")
    status: Literal["uploading", "validating", "ready", "failed"] = Field(
        description="jobs can use a `ready` dataset; `failed` says why in `error`")
    num_parts: int = Field(description="archives appended to it (0: uploaded as one archive)")
    error: str | None = None
    created_at: datetime


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: str | None = Field(None, max_length=500, description="a name for the dataset")


class BackboneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="`proxy`, a folder of the models directory, an open_clip architecture "
                                   "(e.g. ViT-B-16, with `pretrained`) or hf-hub:ORG/REPO",
                       examples=["proxy", "ViT-B-16"])
    pretrained: str | None = Field(None, description="open_clip pretrained tag, for architecture names",
                                   examples=["openai"])


Method = Literal["zero-shot", "coft", "coft+"]


class Callback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2000, description="http(s) URL of a public host (or one the operator allows)")
    secret: str = Field(min_length=16, max_length=200, description="signs each event: header Coft-Signature "
                        "`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f'{t}.{body}')>`")


class WebhookDeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    event: str = Field(description="job.running, job.succeeded, job.failed, job.cancelled, ...")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset_id": "ds_3f9c2a1b7e8d4c5a6b7c", "class_names": ["sparrow", "robin", "blue jay"], "method": "coft",
        "backbone": {"model": "proxy"}, "config": {"phase1": {"epochs": 10}}}]})

    dataset_id: str
    class_names: list[str] = Field(min_length=2, max_length=MAX_CLASSES)
    method: Method = "coft"
    backbone: BackboneSpec | None = Field(None, description="default: the service's default model (proxy)")
    template: str | None = Field(None, description='zero-shot prompt template with "{}" for the class name',
                                 examples=["a photo of a {}, a type of bird."])
    config: CoFTConfig | None = Field(None, description="overrides of the method config: any subset of its fields; "
                                                         "the rest keep their defaults")
    eval_dataset_id: str | None = Field(None, description="labelled archive (class-name folders): reports true "
                                                          "accuracy, never used for training")
    class_descriptions: dict[str, list[str]] | None = Field(
        None, description="sentences per class for the initial pseudo-labels, every class present; default for "
                          "coft+: the configured LLM, else the template ensemble (metrics.prompt_source says which)",
        examples=[{"sparrow": ["a photo of a sparrow, a small brown bird."], "robin": ["a robin, orange breast."]}])
    callback: Callback | None = Field(None, description="POST each change of the job's state here, signed "
                                                        "with the secret (webhooks)")
    parent_job_id: str | None = Field(None, description="the job this one refines (e.g. with corrected labels); "
                                                         "recorded, shown as the new job's parent")
    labels: dict[str, str] | None = Field(None, max_length=10000, description="true classes of some of the dataset's "
                                          "images, by path ({\"img001.jpg\": \"cat\"}): trained on as labelled shots "
                                          "(coft, coft+)")

    @field_validator("class_names")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        return check_class_names(names)

    @field_validator("template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        return template if template is None else check_template(template)

    @model_validator(mode="after")
    def _descriptions(self) -> "JobCreate":
        if self.class_descriptions is not None:
            from coft import validate_descriptions

            self.class_descriptions = validate_descriptions(self.class_descriptions, self.class_names)
        return self

    def as_request(self) -> JobRequest:
        return JobRequest(dataset_id=self.dataset_id, class_names=self.class_names, method=self.method,
                          model=self.backbone.model if self.backbone else None,
                          pretrained=self.backbone.pretrained if self.backbone else None, template=self.template,
                          config=self.config.model_dump(exclude_unset=True) if self.config else None,
                          eval_dataset_id=self.eval_dataset_id,
                          class_descriptions=self.class_descriptions,
                          callback_url=self.callback.url if self.callback else None,
                          callback_secret=self.callback.secret if self.callback else None,
                          parent_job_id=self.parent_job_id, labels=self.labels)


class JobError(BaseModel):
    code: str
    message: str


JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        "id": "job_8e1f0c2d3b4a59687766", "status": "running", "stage": "phase1-model1", "progress": 0.31,
        "eta_s": 412.0, "metrics": {"s_star_size": 48}, "error": None, "classifier_id": None,
        "dataset_id": "ds_3f9c2a1b7e8d4c5a6b7c", "eval_dataset_id": None, "class_names": ["sparrow", "robin"],
        "method": "coft", "backbone": {"model": "proxy", "pretrained": None}, "template": None, "config": {},
        "attempts": 1, "created_at": "2026-01-01T12:00:00Z", "updated_at": "2026-01-01T12:03:00Z",
        "started_at": "2026-01-01T12:00:02Z", "finished_at": None}]})

    id: str
    status: JobStatusName
    stage: str | None
    progress: float = Field(description="0..1 over the whole run")
    eta_s: float | None = Field(description="estimated seconds left, once measurable")
    metrics: dict[str, Any] = Field(description="label-free quality signals (and accuracy with an eval set)")
    error: JobError | None
    classifier_id: str | None
    dataset_id: str | None
    eval_dataset_id: str | None
    class_names: list[str]
    method: str
    callback_url: str | None = None
    parent_job_id: str | None = None
    labels: dict[str, str] | None = None
    backbone: BackboneSpec
    template: str | None
    config: dict[str, Any]
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @field_validator("metrics", "config", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        return {} if value is None else value


class PredictionJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset_id: str = Field(max_length=40, description="a ready dataset of this tenant")
    top_k: int = Field(5, ge=1, le=100, description="labels kept per image, most probable first")


class AliasSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classifier_id: str = Field(max_length=64, description="the classifier the alias names from now on (or another alias)")


class AliasOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    name: str
    classifier_id: str
    updated_at: datetime


class ClassifierOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    job_id: str | None
    class_names: list[str]
    method: str
    backbone: BackboneSpec
    num_members: int
    size_bytes: int
    created_at: datetime


class LabelProbability(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    filename: str
    label: str
    probability: float
    top_k: list[LabelProbability]


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"predictions": [{
        "filename": "bird.jpg", "label": "robin", "probability": 0.91,
        "top_k": [{"label": "robin", "probability": 0.91}, {"label": "sparrow", "probability": 0.06}]}]}]})

    predictions: list[ImagePrediction]


class DatasetPrediction(BaseModel):
    index: int | None = Field(None, description="the image's position in the dataset (its thumbnail's index)")
    name: str = Field(description="the image's path inside the dataset archive")
    label: str
    probability: float
    top_k: list[LabelProbability] | None = Field(None, description="prediction jobs: the most probable labels")
    # adaptation jobs: what the method did with the image
    zero_shot_label: str | None = None
    s_star: bool | None = Field(None, description="in S*, Phase I's training set (with its zero-shot label)")
    model_labels: list[str] | None = Field(None, description="each Phase I model's label for it")
    clean: list[bool] | None = Field(None, description="per model: its label was accepted into its Phase II set")
    given_label: str | None = Field(None, description="the label the job was given for it (`labels`)")


class ModelOut(BaseModel):
    name: str
    kind: Literal["proxy", "models-dir"]

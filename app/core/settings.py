"""All service settings, read once from the environment (prefix COFT_, plus REDIS_URL and DATABASE_URL).

One class, shared by the API, the worker and the CLI, so a deployment is configured in one place.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coft import DataLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COFT_", extra="ignore", populate_by_name=True)

    data_dir: Path = Path("data")  # datasets, checkpoints, classifier artifacts, the SQLite file
    # Where datasets, checkpoints and artifacts go: s3://bucket/prefix (with COFT_S3_ENDPOINT_URL for
    # MinIO and other S3-compatible stores; credentials and region from the AWS variables), or local
    # disk under data_dir when unset.
    storage_url: str | None = None
    s3_endpoint_url: str | None = None
    # What a host keeps of what it downloads from the store (datasets, artifacts) and of running jobs'
    # work (decoded images): a bounded cache, least recently used first out.
    cache_dir: Path | None = None  # default <data_dir>/cache
    cache_max_bytes: int = 50 * 2**30
    models_dir: Path | None = None  # operator-supplied open_clip local-dir models; default <data_dir>/models
    # The usual unprefixed names win because every hosting platform and tool speaks them.
    database_url: str | None = Field(None, validation_alias=AliasChoices("DATABASE_URL", "COFT_DATABASE_URL"))
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "COFT_REDIS_URL"))
    bootstrap_api_key: str | None = None  # created at start for tenant `bootstrap_tenant` if missing
    bootstrap_tenant: str = "default"

    # Uploads
    max_upload_bytes: int = 2 * 2**30
    # Datasets: a tenant's stored datasets may hold this many bytes in all (None: no quota); an archive
    # larger than inline_validation_bytes is validated in the background (status `validating`), and a
    # dataset uploaded in parts has at most max_dataset_parts of them, each up to max_upload_bytes.
    tenant_quota_bytes: int | None = Field(100 * 2**30, ge=0)
    inline_validation_bytes: int = Field(64 * 2**20, ge=0)
    max_dataset_parts: int = Field(1000, ge=1)
    max_predict_images: int = 64  # per predict request
    max_predict_bytes: int = 64 * 2**20  # per predict request body
    classifier_cache_size: int = 4  # loaded classifiers (and zero-shot backbones) kept in memory
    # Concurrent predict requests for one classifier share forward passes (as Triton's dynamic batcher):
    # up to this many images, waiting at most this long for a batch to fill.
    predict_max_batch: int = Field(64, ge=1, le=4096)
    predict_max_wait_ms: float = Field(5.0, ge=0, le=1000)
    # What one image and one archive may cost to validate; the same image limits apply to /predict.
    max_image_pixels: int = 40_000_000  # width*height, checked on the header before decoding
    max_image_bytes: int = 50 * 2**20  # one image file (an archive member, or a predict upload)
    max_archive_entries: int = 100_000
    max_archive_ratio: float = 200.0  # uncompressed/compressed, beyond which an archive is a zip bomb

    # Per-tenant rate limits, in the `limits` package's notation ("30/minute", "10/second;500/hour").
    # Counted in Redis when REDIS_URL is set (shared by every API process), else in this process.
    rate_limit_uploads: str = "60/minute"  # POST /v1/datasets
    rate_limit_predict: str = "6000/minute"  # classifier and zero-shot predict requests
    # How long the gate of those routes remembers which tenant a key belongs to (0: ask the database each time).
    api_key_cache_s: float = Field(30.0, ge=0)

    # Jobs
    default_model: str = "proxy"
    device: str | None = None  # torch device for jobs and predictions; None: cuda when available
    heartbeat_interval_s: float = 5.0  # how often a running job writes progress + heartbeat
    heartbeat_stale_s: float = 120.0  # a RUNNING job silent this long has lost its worker
    sweep_interval_s: float = 15.0
    # A job QUEUED this long is sent to the broker again, in case its message was lost (Redis restarted
    # without persistence). Duplicates are harmless: only one worker can claim the row.
    queued_resend_s: float = 600.0
    max_attempts: int = 3  # worker deaths tolerated per job before it is FAILED
    job_time_limit_s: int = 24 * 3600  # hard limit per job attempt; the soft limit is 60 s earlier
    # Test and demo aid: sleep this long in every progress event so a tiny job's stages can be watched.
    worker_progress_delay_s: float = 0.0

    # Webhooks: callback URLs may name only public addresses, unless listed here (host names or CIDR
    # ranges, e.g. ["hooks.internal", "10.1.0.0/16"]); each event is tried up to max_attempts times,
    # backoff_s x 2^(attempt-1) apart. The API process delivers, polling every poll_s.
    webhook_allowed_hosts: list[str] = []
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_max_attempts: int = Field(6, ge=1)
    webhook_backoff_s: float = Field(2.0, ge=0)
    webhook_poll_s: float = Field(1.0, gt=0)

    # CoFT+ class descriptions from an OpenAI-compatible chat-completions endpoint (COFT_LLM_BASE_URL,
    # e.g. https://host/v1, and COFT_LLM_MODEL); unset: the built-in template ensemble.
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_timeout_s: float = 30.0

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("device", mode="before")
    @classmethod
    def _blank_device_is_automatic(cls, value: str | None) -> str | None:
        # compose passes an unset ${VAR:-} as "": the same as not setting it
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _defaults_under_data_dir(self) -> "Settings":
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        if self.cache_dir is None:
            self.cache_dir = self.data_dir / "cache"
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'coft.db').resolve()}"
        if self.heartbeat_stale_s <= 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_stale_s must exceed twice heartbeat_interval_s")
        return self

    def data_limits(self) -> DataLimits:
        """coft.data's limits as configured here: uploads, job inputs and predict images alike."""
        return DataLimits(max_image_pixels=self.max_image_pixels, max_file_bytes=self.max_image_bytes,
                          max_entries=self.max_archive_entries, max_compression_ratio=self.max_archive_ratio)

    @property
    def broker_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("REDIS_URL is not set (`python -m app.serve` starts a Redis for you)")
        return self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()

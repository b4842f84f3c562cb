"""Database tables. Every change here needs an Alembic migration in migrations/versions/."""

from __future__ import annotations

import enum
import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Enum, Float, ForeignKey, Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id(prefix: str) -> str:
    """Opaque, unguessable ids with a type prefix (`job_...`), so a pasted id says what it is."""
    return f"{prefix}_{secrets.token_hex(10)}"


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend: SQLite has no time zones, so store naive UTC and
    attach UTC on the way out; comparisons in SQL (stale heartbeats) then agree on both backends."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use app.models.utcnow()")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the whole key
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetStatus(enum.StrEnum):
    UPLOADING = "uploading"
    VALIDATING = "validating"
    READY = "ready"
    FAILED = "failed"


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    num_images: Mapped[int] = mapped_column(Integer)
    rejected: Mapped[list[Any]] = mapped_column(default=list)  # [{path, reason}], the first 1000
    num_rejected: Mapped[int] = mapped_column(Integer, default=0)
    # uploading (parts being appended) -> validating (in the background) -> ready | failed (`error` says why)
    status: Mapped[str] = mapped_column(String(20), default=DatasetStatus.READY, server_default=DatasetStatus.READY)
    num_parts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 0: one archive, one request
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class _NamesABackbone:
    """The backbone a job adapted, or a classifier was built on, as the API names it."""

    backbone_model: Mapped[str] = mapped_column(String(500))
    backbone_pretrained: Mapped[str | None] = mapped_column(String(500))

    @property
    def backbone(self) -> dict[str, str | None]:
        return {"model": self.backbone_model, "pretrained": self.backbone_pretrained}


class Job(_NamesABackbone, Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # SET NULL: a finished job outlives its dataset; deleting one an active job uses is refused (409).
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    eval_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    class_names: Mapped[list[Any]]
    method: Mapped[str] = mapped_column(String(32))
    template: Mapped[str | None] = mapped_column(String(500))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the user's overrides, validated
    class_descriptions: Mapped[dict[str, Any] | None]  # CoFT+ prompts given by the user, {class: [sentences]}

    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        index=True, default=JobStatus.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # also the fencing token of the current attempt
    heartbeat_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(200))  # hostname:pid of the current attempt
    classifier_id: Mapped[str | None] = mapped_column(String(40))

    # Steering: the job this one was started from, and labels the user gave some of the dataset's
    # images ({image path: class}); the run trains on them as labelled shots.
    parent_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    labels: Mapped[dict[str, Any] | None]
    # Webhooks (app.core.webhooks): where state changes are POSTed, and the secret that signs them.
    callback_url: Mapped[str | None] = mapped_column(String(2000))
    callback_secret: Mapped[str | None] = mapped_column(String(200))

    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))  # same key, different body -> 409

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)  # started -> finished, for /metrics

    @property
    def error(self) -> dict[str, str] | None:
        return {"code": self.error_code, "message": self.error_message or ""} if self.error_code else None


class Classifier(_NamesABackbone, Base):
    __tablename__ = "classifiers"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("clf"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    class_names: Mapped[list[Any]]
    method: Mapped[str] = mapped_column(String(32))
    num_members: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    # The artifact's storage key: written once, before the row names it (app.core.storage.put_dir).
    artifact_key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ClassifierAlias(Base):
    """A tenant's name for one of its classifiers (`production`), usable wherever a classifier id is;
    moved to another classifier in one update, so every request sees the old one or the new one."""
    __tablename__ = "classifier_aliases"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    classifier_id: Mapped[str] = mapped_column(ForeignKey("classifiers.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event for a job's callback URL, and how its delivery went (an outbox row)."""
    __tablename__ = "webhook_deliveries"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("wh"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

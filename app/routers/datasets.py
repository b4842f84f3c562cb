"""Datasets: an uploaded archive of images, validated once on upload by coft.data."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile, status
from sqlalchemy import or_, select

from coft import DataError, open_images
from app.deps import SessionDep, SettingsDep, get_owned, StorageDep, TenantDep
from app.errors import Problem
from app.models import Dataset, Job, JobStatus, new_id
from app.pagination import PageDep, paginate
from app.schemas import DatasetOut, Page
from app.storage import dataset_archive, dataset_dir

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
MAX_REJECTED_STORED = 1000
_CHUNK = 1 << 20


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={422: {"description": "unusable archive (problem type = coft.data error code)"},
                        413: {"description": "upload larger than COFT_MAX_UPLOAD_BYTES"}})
def create_dataset(file: Annotated[UploadFile, File(description="zip or tar(.gz) archive of images")],
                   session: SessionDep, tenant: TenantDep, storage: StorageDep, settings: SettingsDep,
                   response: Response) -> Dataset:
    """Upload an archive of images (multipart field `file`). Unusable files are listed with a reason;
    an archive with no usable image, or a hostile one (zip bomb, path traversal, links), is refused."""
    dataset_id = new_id("ds")
    key = dataset_archive(dataset_id)
    # Starlette has already spooled the upload to a temporary file; copy it into storage in chunks.
    size, sha256 = storage.write(key, iter(lambda: file.file.read(_CHUNK), b""))
    try:
        with storage.local_file(key) as path:
            images = open_images(path, limits=settings.data_limits())  # decodes every image: bad ones are `rejected`
    except DataError as error:
        storage.delete(dataset_dir(dataset_id))
        raise Problem(422, error.code, error.message, "Unusable dataset") from None
    rejected = [{"path": r.path, "reason": r.reason} for r in images.rejected]
    # NUL is the one character PostgreSQL text refuses; a client-chosen name must not make a 500.
    filename = (file.filename or "upload").replace("\x00", "")[:500]
    dataset = Dataset(id=dataset_id, tenant_id=tenant.id, filename=filename,
                      size_bytes=size, sha256=sha256, num_images=len(images),
                      rejected=rejected[:MAX_REJECTED_STORED], num_rejected=len(rejected))
    session.add(dataset)
    session.commit()
    response.headers["Location"] = f"/v1/datasets/{dataset_id}"
    return dataset


@router.get("", response_model=Page[DatasetOut])
def list_datasets(session: SessionDep, tenant: TenantDep, page: PageDep) -> dict:
    items, total = paginate(session, select(Dataset).where(Dataset.tenant_id == tenant.id), page,
                            (Dataset.created_at.desc(), Dataset.id))
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


def get_owned_dataset(session, tenant, dataset_id: str) -> Dataset:
    return get_owned(session, tenant, Dataset, dataset_id, "dataset")


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return get_owned_dataset(session, tenant, dataset_id)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={409: {"description": "an active job uses the dataset"}})
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep) -> None:
    dataset = get_owned_dataset(session, tenant, dataset_id)
    active = session.scalars(select(Job.id).where(
        or_(Job.dataset_id == dataset_id, Job.eval_dataset_id == dataset_id),
        Job.status.in_([s for s in JobStatus if s.active]))).all()
    if active:
        raise Problem(409, "dataset-in-use", f"jobs {', '.join(active)} use this dataset; cancel them or wait",
                      "Dataset in use", jobs=list(active))
    session.delete(dataset)
    session.commit()
    storage.delete(dataset_dir(dataset_id))

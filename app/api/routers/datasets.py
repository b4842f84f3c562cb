"""Datasets: an uploaded archive of images, validated once on upload by coft.data."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile, status

from app.api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.pagination import PageDep, newest_first
from app.api.schemas import DatasetOut, Page
from app.core import crud
from app.core.models import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
_CHUNK = 1 << 20


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={422: {"description": "unusable archive (problem type = coft.data error code)"},
                        413: {"description": "upload larger than COFT_MAX_UPLOAD_BYTES"}})
def create_dataset(file: Annotated[UploadFile, File(description="zip or tar(.gz) archive of images")],
                   session: SessionDep, tenant: TenantDep, storage: StorageDep, settings: SettingsDep,
                   response: Response) -> Dataset:
    """Upload an archive of images (multipart field `file`). Unusable files are listed with a reason;
    an archive with no usable image, or a hostile one (zip bomb, path traversal, links), is refused."""
    # Starlette has already spooled the upload to a temporary file; it goes into storage in chunks.
    dataset = crud.create_dataset(session, tenant.id, storage, settings, file.filename,
                                  iter(lambda: file.file.read(_CHUNK), b""))
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


@router.get("", response_model=Page[DatasetOut])
def list_datasets(session: SessionDep, tenant: TenantDep, page: PageDep) -> dict:
    return newest_first(session, Dataset, tenant.id, page)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Dataset:
    return crud.owned(session, tenant.id, Dataset, dataset_id, "dataset")


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={409: {"description": "an active job uses the dataset"}})
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep) -> None:
    crud.delete_dataset(session, tenant.id, storage, dataset_id)

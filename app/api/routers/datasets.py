"""Datasets: archives of images, validated once by coft.data: in the upload request, or in the
background for a large archive and for a dataset uploaded in parts (create, append, finalise)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, Query, Request, Response, UploadFile, status

from app.api.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.api.pagination import PageDep, newest_first
from app.api.schemas import DatasetOut, Page, UploadCreate
from app.core import crud
from app.core.models import Dataset, DatasetStatus

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
_CHUNK = 1 << 20


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={202: {"description": "stored; a large archive is validated in the background "
                                             "(status `validating`: poll GET /v1/datasets/{id})",
                              "model": DatasetOut},
                        422: {"description": "unusable archive (problem type = coft.data error code)"},
                        413: {"description": "upload larger than COFT_MAX_UPLOAD_BYTES, or over the tenant's quota"}})
def create_dataset(file: Annotated[UploadFile, File(description="zip or tar(.gz) archive of images")],
                   session: SessionDep, tenant: TenantDep, storage: StorageDep, settings: SettingsDep,
                   response: Response, background: BackgroundTasks) -> Dataset:
    """Upload an archive of images (multipart field `file`). Unusable files are listed with a reason;
    an archive with no usable image, or a hostile one (zip bomb, path traversal, links), is refused."""
    # Starlette has already spooled the upload to a temporary file; it goes into storage in chunks.
    dataset = crud.create_dataset(session, tenant.id, storage, settings, file.filename,
                                  iter(lambda: file.file.read(_CHUNK), b""))
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    if dataset.status == DatasetStatus.VALIDATING:
        response.status_code = status.HTTP_202_ACCEPTED
        background.add_task(crud.validate_dataset, settings, storage, dataset.id)
    return dataset


@router.post("/uploads", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={413: {"description": "the tenant's quota is used up"}})
def create_upload(body: UploadCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
                  response: Response) -> Dataset:
    """Start a dataset too large for one request: append archives to it
    (`POST /v1/datasets/{id}/parts`), then `POST /v1/datasets/{id}/finalize`."""
    dataset = crud.create_upload(session, tenant.id, settings, body.filename)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


@router.post("/{dataset_id}/parts", response_model=DatasetOut,
             responses={409: {"description": "the dataset was finalised"},
                        413: {"description": "part larger than COFT_MAX_UPLOAD_BYTES, or over the tenant's quota"}})
def append_part(dataset_id: str, file: Annotated[UploadFile, File(description="zip or tar(.gz) archive of images")],
                session: SessionDep, tenant: TenantDep, storage: StorageDep, settings: SettingsDep) -> Dataset:
    """Append one archive (multipart field `file`); paths repeated across parts count once."""
    return crud.append_part(session, tenant.id, storage, settings, dataset_id,
                            iter(lambda: file.file.read(_CHUNK), b""))


@router.post("/{dataset_id}/finalize", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetOut,
             responses={409: {"description": "the dataset was finalised already"}})
def finalize_upload(dataset_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep,
                    settings: SettingsDep, background: BackgroundTasks) -> Dataset:
    """No more parts: every image is checked in the background (status `validating`, then `ready`, or
    `failed` with the reason in `error`)."""
    dataset = crud.finalize_upload(session, tenant.id, dataset_id)
    background.add_task(crud.validate_dataset, settings, storage, dataset.id)
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


@router.get("/{dataset_id}/images/{index}/thumbnail", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the image, at most `size` pixels wide and high"},
                       404: {"description": "no such dataset, or no image at that index"},
                       409: {"description": "the dataset is not ready"}})
def thumbnail(dataset_id: str, index: int, session: SessionDep, tenant: TenantDep, storage: StorageDep,
              settings: SettingsDep, request: Request,
              size: Annotated[int, Query(ge=16, le=512, description="longer side, in pixels")] = 128) -> Response:
    """Image `index` of the dataset, small: the order is that of its jobs' predictions (their `index`)."""
    dataset = crud.ready_dataset(session, tenant.id, dataset_id)
    def render() -> bytes:  # from the dataset's archives, opened once for all its thumbnails
        images = request.app.state.dataset_indexes.get(
            dataset.id, lambda: crud.dataset_index(storage, dataset, settings.data_limits()))
        return crud.thumbnail(images, index, size)

    jpeg = request.app.state.thumbnails.get((dataset.id, index, size), render)
    # A dataset's images never change: the browser may keep them (privately: they are the tenant's).
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

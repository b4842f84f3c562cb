"""Datasets over HTTP: upload (zip, tar.gz), rejected files, hostile archives, list, get, delete, auth."""

from __future__ import annotations

import io
import socket
import zipfile

import pytest

from tests.service.helpers import image_tar_gz, image_zip, png

pytestmark = pytest.mark.store  # the story on the S3 store too

PROBLEM = "application/problem+json"


def upload(api, data: bytes, filename: str = "images.zip"):
    return api.post("/v1/datasets", files={"file": (filename, data, "application/octet-stream")})


def test_upload_zip_reports_usable_and_rejected_files(api):
    response = upload(api, image_zip(6, extra={"notes.txt": b"hello", "broken.png": b"\x89PNG garbage"}))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("ds_")
    assert response.headers["location"] == f"/v1/datasets/{body['id']}"
    assert body["num_images"] == 6
    assert body["num_rejected"] == 2
    reasons = {r["path"]: r["reason"] for r in body["rejected"]}
    assert reasons["notes.txt"] == "not an image file"
    assert "broken.png" in reasons
    assert api.get(f"/v1/datasets/{body['id']}").json() == body


def test_upload_tar_gz(api):
    response = upload(api, image_tar_gz(5), "photos.tar.gz")
    assert response.status_code == 201, response.text
    assert response.json()["num_images"] == 5


def test_hostile_and_useless_archives_are_problems(api):
    traversal = io.BytesIO()
    with zipfile.ZipFile(traversal, "w") as archive:
        archive.writestr("../evil.png", png(1))
    cases = {
        "path-traversal": traversal.getvalue(),
        "unsupported-format": b"this is not an archive at all",
        "no-usable-images": image_zip(0, extra={"readme.txt": b"no images here"}),
    }
    for code, data in cases.items():
        response = upload(api, data)
        assert response.status_code == 422, (code, response.text)
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["type"] == f"https://coft.dev/problems/{code}"
        assert problem["status"] == 422 and problem["title"] and problem["detail"]
    assert api.get("/v1/datasets").json()["total"] == 0


def test_missing_file_field_is_a_validation_problem(api):
    response = api.post("/v1/datasets", files={"wrong": ("a.zip", b"x")})
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "https://coft.dev/problems/validation-error"


def test_list_is_paginated_newest_first(api):
    ids = [upload(api, image_zip(1)).json()["id"] for _ in range(3)]
    page = api.get("/v1/datasets", params={"limit": 2}).json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
    assert [d["id"] for d in page["items"]] == ids[::-1][:2]
    rest = api.get("/v1/datasets", params={"limit": 2, "offset": 2}).json()
    assert [d["id"] for d in rest["items"]] == [ids[0]]
    assert api.get("/v1/datasets", params={"limit": 0}).status_code == 422


def test_delete(api):
    dataset_id = upload(api, image_zip(1)).json()["id"]
    assert api.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    response = api.get(f"/v1/datasets/{dataset_id}")
    assert response.status_code == 404
    assert response.json()["type"] == "https://coft.dev/problems/dataset-not-found"


def test_auth_and_tenant_isolation(stack, api):
    dataset_id = upload(api, image_zip(1)).json()["id"]
    other = stack.client(stack.new_key())
    assert other.get(f"/v1/datasets/{dataset_id}").status_code == 404
    assert other.delete(f"/v1/datasets/{dataset_id}").status_code == 404
    assert other.get("/v1/datasets").json()["total"] == 0
    for client in (stack.client(), stack.client("coft_wrong-key-0000000000")):
        response = client.get("/v1/datasets")
        assert response.status_code == 401
        assert response.headers["content-type"] == PROBLEM
        assert response.headers["www-authenticate"] == "Bearer"
    assert api.get(f"/v1/datasets/{dataset_id}").status_code == 200


def test_upload_over_the_limit_is_413(stack, api):
    """A body declaring more than COFT_MAX_UPLOAD_BYTES is refused before it is read (raw socket:
    no client library lets us lie about Content-Length)."""
    key = api.headers["authorization"]
    request = (f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
               f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {3 * 2**30}\r\n\r\n--x\r\n")
    with socket.create_connection(("127.0.0.1", stack.server.port), timeout=10) as connection:
        connection.sendall(request.encode())
        head = connection.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head
    assert "application/problem+json" in head

"""Hostile input over real HTTP: every archive trick, image bomb, truncated or disguised file, oversized
body and bad class list gets a 4xx problem+json with a specific type, nothing lands outside the data
directory, and the service keeps answering.

One API (uvicorn, SQLite) with small limits, so a bomb or an oversized body is a few kilobytes to
build and send rather than gigabytes.
"""

from __future__ import annotations

import io
import os
import select
import socket
import struct
import tarfile
import uuid
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest

from tests.archives import make_tar
from tests.service.conftest import ServerThread
from tests.service.helpers import TINY_MODEL, image_zip, png

PROBLEM = "application/problem+json"
MARKER = f"coft-evil-{uuid.uuid4().hex[:8]}"  # in every hostile member name, searched for afterwards
LIMITS = {"max_upload_bytes": 2**20, "max_predict_bytes": 2**20, "max_archive_entries": 200,
          "max_image_pixels": 1_000_000, "max_image_bytes": 256 * 2**10}


@pytest.fixture(scope="module")
def strict(stacks):
    """(stack, base URL of an API with LIMITS on the stack's database and data directory)."""
    from app.api.main import create_app

    stack = stacks("sqlite")
    server = ServerThread(create_app(stack.settings.model_copy(update=LIMITS)))
    server.start()
    yield stack, f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def client(strict):
    stack, url = strict
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {stack.new_key()}"}, timeout=60) as c:
        yield c


# --------------------------------------------------------------------------- hostile files


def jpeg(seed: int = 0) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png(seed, 64))).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A decompression bomb's calling card: a tiny PNG whose header claims a huge image."""
    data = bytearray(png(0, 8))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


PDF_AS_JPEG = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
BAD_IMAGES = {  # file name -> (bytes, what the rejection reason says)
    "bomb.png": (png_claiming(40_000, 40_000), "too large"),
    "wide.png": (png_claiming(5_000, 5_000), "too large"),  # 25 Mpx: under Pillow's own guard, over ours
    "cut.jpg": (jpeg()[:400], "truncated"),
    "cut.png": (png(3, 64)[:300], "truncated"),
    "cat.jpg": (PDF_AS_JPEG, "not a decodable image"),
    "notes.txt": (b"just text", "not an image file"),
}


def a_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # what `zip --symlinks` writes
            archive.writestr(info, target)
    return buffer.getvalue()


def a_tar(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None, mode: str = "w:gz") -> bytes:
    """`links`: member name -> (tarfile.SYMTYPE or LNKTYPE, target)."""
    extra = []
    for name, (kind, target) in (links or {}).items():
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        extra.append(info)
    return make_tar(members, mode, extra)


GOOD = {"ok.png": png(1)}
HOSTILE_ARCHIVES = {
    "zip-path-traversal": (a_zip({**GOOD, f"../../{MARKER}.png": png(2)}), "path-traversal"),
    "zip-absolute-path": (a_zip({**GOOD, f"/tmp/{MARKER}.png": png(2)}), "absolute-path"),
    "zip-windows-absolute-path": (a_zip({**GOOD, f"C:\\{MARKER}.png": png(2)}), "absolute-path"),
    "tar-path-traversal": (a_tar({**GOOD, f"a/../../{MARKER}.png": png(2)}), "path-traversal"),
    "tar-absolute-path": (a_tar({**GOOD, f"/tmp/{MARKER}.png": png(2)}), "absolute-path"),
    "zip-symlink": (a_zip(GOOD, symlinks={f"{MARKER}.png": "/etc/passwd"}), "link-in-archive"),
    "tar-symlink": (a_tar(GOOD, links={f"{MARKER}.png": (tarfile.SYMTYPE, "/etc/passwd")}), "link-in-archive"),
    "tar-hardlink": (a_tar(GOOD, links={f"{MARKER}.png": (tarfile.LNKTYPE, "/etc/passwd")}), "link-in-archive"),
    # Bombs: 8 MB of zeros in ~10 KB, as many members each under the per-file limit...
    "zip-bomb": (a_zip({**GOOD, **{f"zeros{i}.png": bytes(200 * 2**10) for i in range(40)}}), "compression-ratio"),
    "tar-gz-bomb": (a_tar({**GOOD, **{f"zeros{i}.png": bytes(200 * 2**10) for i in range(40)}}),
                    "compression-ratio"),
    # ...or as one member over it, refused on its declared size before anything is inflated.
    "zip-member-too-large": (a_zip({**GOOD, "zeros.png": bytes(8 * 2**20)}), "archive-too-large"),
    "zip-many-entries": (a_zip({f"{i}.txt": b"" for i in range(LIMITS["max_archive_entries"] + 1)}),
                         "too-many-entries"),
    "tar-many-entries": (a_tar({f"{i}.txt": b"" for i in range(LIMITS["max_archive_entries"] + 1)}, mode="w"),
                         "too-many-entries"),
    "nested-zip": (a_zip({**GOOD, "more.zip": a_zip(GOOD)}), "nested-archive"),
    "nested-tar-gz": (a_zip({**GOOD, "more.tar.gz": a_tar(GOOD)}), "nested-archive"),
    "no-image-at-all": (a_zip({"readme.txt": b"hello", "data.csv": b"a,b"}), "no-usable-images"),
    "only-bad-images": (a_zip({name: data for name, (data, _) in BAD_IMAGES.items()}), "no-usable-images"),
    "not-an-archive": (b"GIF89a but really just some bytes" * 10, "unsupported-format"),
    "corrupt-zip": (b"PK\x03\x04" + os.urandom(2000), "corrupt-archive"),
    "corrupt-gzip": (b"\x1f\x8b\x08\x00" + os.urandom(2000), "corrupt-archive"),
}


def files_named(root: Path, marker: str) -> list[Path]:
    return [Path(d) / f for d, _, names in os.walk(root) for f in names if marker in f]


@pytest.mark.parametrize("case", HOSTILE_ARCHIVES)
def test_hostile_archive_is_a_problem_and_nothing_escapes(strict, client, case):
    stack, _ = strict
    data, slug = HOSTILE_ARCHIVES[case]
    datasets = stack.settings.data_dir / "store" / "datasets"
    before = set(datasets.iterdir()) if datasets.exists() else set()
    response = client.post("/v1/datasets", files={"file": (f"{case}.bin", data, "application/octet-stream")})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == f"https://coft.dev/problems/{slug}", problem
    assert problem["status"] == 422 and problem["detail"]
    # Nothing kept, and no member written anywhere: not in the data directory, its parent, /tmp or here.
    assert (set(datasets.iterdir()) if datasets.exists() else set()) == before
    for root in (stack.settings.data_dir.parent, Path.cwd()):
        assert files_named(root, MARKER) == []
    assert not any(MARKER in name for name in os.listdir("/tmp"))
    assert client.get("/v1/datasets").json()["total"] == 0
    ready = client.get("/readyz")
    assert ready.status_code in (200, 503) and ready.json()["checks"]["database"] == "ok"


def test_bad_images_next_to_good_ones_are_listed_with_reasons(client):
    response = client.post("/v1/datasets", files={"file": ("mixed.zip", a_zip(
        {**GOOD, **{name: data for name, (data, _) in BAD_IMAGES.items()}}))})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_images"] == 1
    reasons = {r["path"]: r["reason"] for r in body["rejected"]}
    for name, (_, reason) in BAD_IMAGES.items():
        assert reason in reasons[name], (name, reasons[name])


def test_predict_applies_the_same_image_limits(client):
    url = "/v1/zero-shot/predict"
    form = {"class_names": ["cat", "dog"], "model": TINY_MODEL}
    ok = client.post(url, data=form, files=[("images", ("ok.png", png(1), "image/png"))])
    assert ok.status_code == 200, ok.text
    bad = {**BAD_IMAGES, "huge.png": (png(5, 320), "too large"),  # a real PNG over COFT_MAX_IMAGE_BYTES
           "notes.txt": (b"just text", "not a decodable image")}  # predict goes by content, not by name
    assert len(bad["huge.png"][0]) > LIMITS["max_image_bytes"]
    response = client.post(url, data=form, files=[("images", (name, data)) for name, (data, _) in bad.items()])
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "https://coft.dev/problems/unusable-image"
    reasons = {r["filename"]: r["reason"] for r in problem["rejected"]}
    assert reasons.keys() == bad.keys()
    for name, (_, reason) in bad.items():
        assert reason in reasons[name], (name, reasons[name])
    assert client.get("/readyz").json()["checks"]["database"] == "ok"


# --------------------------------------------------------------------------- oversized bodies


def raw_post(port: int, path: str, key: str, body_chunks, headers: str = "") -> tuple[str, int]:
    """POST a chunked body over a raw socket, stopping as soon as the server answers; returns the
    response head and how many body bytes were sent before the answer came."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n{headers}"
                            "Transfer-Encoding: chunked\r\n\r\n").encode())
        try:
            for chunk in body_chunks:
                if select.select([connection], [], [], 0)[0]:  # the server has answered: stop sending
                    break
                connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:  # the server closed the connection on us: its answer is waiting
            pass
        head = connection.recv(65536).decode(errors="replace")
    return head, sent


def test_upload_over_the_limit_is_refused_while_streaming(strict):
    stack, url = strict
    port = int(url.rsplit(":", 1)[1])
    limit = LIMITS["max_upload_bytes"]
    total = 256 * limit
    preamble = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n")
    chunks = [preamble] + [bytes(64 * 2**10)] * (total // (64 * 2**10))
    head, sent = raw_post(port, "/v1/datasets", stack.new_key(), chunks,
                          "Content-Type: multipart/form-data; boundary=b\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert PROBLEM in head and "payload-too-large" in head
    assert sent < total // 4, f"the answer came only after {sent} of {total} bytes"


def test_every_body_has_a_size_cap(strict, client):
    limit = LIMITS["max_predict_bytes"]
    predict = client.post("/v1/zero-shot/predict", data={"class_names": ["a", "b"], "model": TINY_MODEL},
                          files=[("images", ("big.png", bytes(limit + 1)))])
    assert predict.status_code == 413 and predict.json()["type"] == "https://coft.dev/problems/payload-too-large"
    job = client.post("/v1/jobs", json={"dataset_id": "ds_x", "class_names": ["a", "b"], "config": {"x": "y" * 2**20}})
    assert job.status_code == 413 and job.headers["content-type"] == PROBLEM


def test_unauthenticated_upload_is_refused_before_the_body_is_read(strict):
    stack, url = strict
    port = int(url.rsplit(":", 1)[1])
    head, sent = raw_post(port, "/v1/datasets", "coft_not-a-key-0000000000", [bytes(64 * 2**10)] * 1024,
                          "Content-Type: multipart/form-data; boundary=b\r\n")
    assert head.startswith("HTTP/1.1 401"), head
    assert sent < 32 * 2**20


# --------------------------------------------------------------------------- class lists


BAD_CLASS_LISTS = {
    "empty": [],
    "one-class": ["cat"],
    "duplicates-by-case": ["cat", "Cat"],
    "duplicates-after-normalisation": ["sea_lion", "Sea  Lion", "dog"],
    "blank": ["cat", "   "],
    "overlong": ["cat", "x" * 201],
    "over-the-limit": [f"class {i}" for i in range(1001)],
}


@pytest.mark.parametrize("case", BAD_CLASS_LISTS)
def test_bad_class_lists(client, case):
    names = BAD_CLASS_LISTS[case]
    dataset_id = client.post("/v1/datasets", files={"file": ("a.zip", image_zip(2))}).json()["id"]
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "class_names": names, "method": "zero-shot",
                                        "backbone": {"model": TINY_MODEL}})
    zero_shot = client.post("/v1/zero-shot/predict", data={"class_names": names, "model": TINY_MODEL},
                            files=[("images", ("ok.png", png(1)))])
    expected = [(job, 422, "invalid-class-names"), (zero_shot, 422, "invalid-class-names")]
    if case == "over-the-limit":  # Starlette's form parser refuses more than 1000 fields before our check
        expected[1] = (zero_shot, 400, "bad-request")
    for response, status, slug in expected:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["type"] == f"https://coft.dev/problems/{slug}", response.json()
    assert client.get("/v1/jobs").json()["total"] == 0

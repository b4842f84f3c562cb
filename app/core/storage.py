"""Where datasets, checkpoints and classifier artifacts live: local disk, or an S3-compatible bucket.

Callers speak in keys (`datasets/ds_x/archive`, `classifiers/clf_x/<version>`), never in paths, and
two settings choose the backend: `COFT_STORAGE_URL` (`s3://bucket/prefix`; unset: local disk under
`COFT_DATA_DIR/store`) and `COFT_S3_ENDPOINT_URL` (MinIO and other S3-compatible stores; region and
credentials come from the usual AWS variables). The S3 backend is built on boto3, the reference
client: every S3-compatible server speaks its protocol (moto, which the tests run, and MinIO).

The interface is shaped for object storage:
- whole-object writes from a stream (`write`), reads as a stream (`open`) or through a local copy
  (`local_file`, `local_dir`: the file itself on local disk; a download into a bounded local cache
  on S3, so a worker fetches a dataset once however many jobs use it);
- write-once directories (`put_dir`): an artifact is written under a new key and only then named
  by a database row, so no reader ever sees half of one, on any backend;
- working directories (`work_dir`, a job's checkpoints): local, filled from the store on entry (a
  job resumed on another host finds its checkpoints) and pushed back by `sync()`, which the worker
  calls after every stage. Their `images/` folder (the decoded-image cache) stays local.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Callable, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from app.core.settings import Settings

LOCAL_ONLY = "images"  # a work directory's folder that is never uploaded (decoded images: large, rebuilt)


@dataclass
class WorkDir:
    """A local working directory kept in step with everything under a key."""

    path: Path
    sync: Callable[[], None] = field(default=lambda: None)


class Storage(Protocol):
    def write(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Store an object atomically; returns (size in bytes, sha256 hex)."""

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """The object as a stream for the duration of the block."""

    def local_file(self, key: str) -> AbstractContextManager[Path]:
        """A local path to the object for the duration of the block."""

    def local_dir(self, key: str) -> AbstractContextManager[Path]:
        """A local, read-only view of everything under `key/`."""

    def work_dir(self, key: str) -> AbstractContextManager[WorkDir]:
        """A writable local directory whose files (but `images/`) end up under `key/` on `sync()`
        and when the block ends; what was stored there before is in it on entry."""

    def put_dir(self, key: str, source: Path) -> int:
        """Store a local directory's files under `key/`, a key never written before (FileExistsError
        otherwise); returns their bytes."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove an object or everything under `key/`; missing keys are fine."""


def check_key(key: str) -> PurePosixPath:
    """Keys are built by our code from generated ids, but a traversal would be a disaster."""
    parts = PurePosixPath(key).parts
    if not parts or key.startswith("/") or any(p in ("..", ".", "") for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return PurePosixPath(*parts)


def _hashed_copy(chunks: Iterable[bytes], out: BinaryIO) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        out.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX name, path) of every file under `root`, but the local-only folder."""
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] != LOCAL_ONLY:
            yield relative.as_posix(), path


class LocalStorage:
    """Keys are paths under one root directory (COFT_DATA_DIR/store)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).parts)

    def write(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                size, sha256 = _hashed_copy(chunks, out)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return size, sha256

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self._path(key).open("rb")

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        yield self._path(key)

    @contextmanager
    def local_dir(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_dir():
            raise FileNotFoundError(key)
        yield path

    @contextmanager
    def work_dir(self, key: str) -> Iterator[WorkDir]:
        path = self._path(key)
        path.mkdir(parents=True, exist_ok=True)
        yield WorkDir(path)

    def put_dir(self, key: str, source: Path) -> int:
        path = self._path(key)
        if path.exists():
            raise FileExistsError(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Copied under a hidden name, then renamed into place in one step: the key holds the whole
        # directory or nothing.
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return sum(p.stat().st_size for _, p in _files(path))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class LocalCache:
    """Downloaded objects on local disk, at most `max_bytes` of them: the least recently used go first.

    Stored objects never change (keys carry generated ids; artifacts are write-once), so an entry
    is valid for as long as its key exists.
    """

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        (self.root / "objects").mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / "objects" / hashlib.sha256(key.encode()).hexdigest()[:32] / check_key(key).name

    def fetch(self, key: str, download: Callable[[Path], None]) -> Path:
        """The cached copy of `key`, downloaded (into a temporary name, then renamed) when missing."""
        path = self.path(key)
        if path.exists():
            os.utime(path)  # recently used
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # racing threads too
        try:
            download(temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> None:
        entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in (self.root / "objects").glob("*/*")
                   if p.is_file() and not p.name.startswith(".")]
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


class S3Storage:
    """Keys are objects under `s3://bucket/prefix/`; reads go through a bounded local cache."""

    def __init__(self, bucket: str, prefix: str, cache: LocalCache, endpoint_url: str | None = None,
                 client=None):
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.cache = cache
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)
        self.transfer = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20)
        self.work_root = cache.root / "work"

    def _key(self, key: str) -> str:
        key = check_key(key).as_posix()
        return f"{self.prefix}/{key}" if self.prefix else key

    def _list(self, key: str) -> Iterator[str]:
        """The names (relative to `key/`) of every object under it."""
        prefix = self._key(key) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                yield entry["Key"][len(prefix):]

    def write(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        # Spooled to disk first: the hash and size are known before the object exists, and the
        # upload can go in parallel parts (an S3 object appears only once it is whole).
        with tempfile.TemporaryFile(dir=self.cache.root) as spool:
            size, sha256 = _hashed_copy(chunks, spool)
            spool.seek(0)
            self.client.upload_fileobj(spool, self.bucket, self._key(key), Config=self.transfer)
        return size, sha256

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        return closing(self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"])

    @contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        yield self._cached(key)

    def _cached(self, key: str) -> Path:
        return self.cache.fetch(key, lambda path: self.client.download_file(
            self.bucket, self._key(key), str(path), Config=self.transfer))

    @contextmanager
    def local_dir(self, key: str) -> Iterator[Path]:
        names = list(self._list(key))
        if not names:
            raise FileNotFoundError(key)
        with tempfile.TemporaryDirectory(dir=self.cache.root) as directory:
            root = Path(directory)
            for name in names:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                # Through the cache (a dataset's parts, a classifier's files are write-once keys), then
                # linked: the cache may evict its copy while this block still reads the link.
                cached = self._cached(f"{key}/{name}")
                try:
                    os.link(cached, root / name)
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(cached, root / name)
            yield root

    @contextmanager
    def work_dir(self, key: str) -> Iterator[WorkDir]:
        path = self.work_root / hashlib.sha256(key.encode()).hexdigest()[:32]
        path.mkdir(parents=True, exist_ok=True)
        pushed: dict[str, tuple[int, float]] = {}
        for name in self._list(key):  # what an earlier attempt, here or on another host, stored
            local = path / name
            if not local.exists():
                local.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, f"{self._key(key)}/{name}", str(local))
            pushed[name] = (local.stat().st_size, local.stat().st_mtime)

        def sync() -> None:
            for name, local in _files(path):
                stamp = (local.stat().st_size, local.stat().st_mtime)
                if name.endswith(".tmp") or pushed.get(name) == stamp:
                    continue
                self.client.upload_file(str(local), self.bucket, f"{self._key(key)}/{name}", Config=self.transfer)
                pushed[name] = stamp

        yield WorkDir(path, sync)
        sync()

    def put_dir(self, key: str, source: Path) -> int:
        if next(self._list(key), None) is not None:
            raise FileExistsError(key)
        size = 0
        for name, path in _files(source):
            self.client.upload_file(str(path), self.bucket, f"{self._key(key)}/{name}", Config=self.transfer)
            size += path.stat().st_size
        return size

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError:
            return next(self._list(key), None) is not None

    def delete(self, key: str) -> None:
        names = [f"{self._key(key)}/{name}" for name in self._list(key)] + [self._key(key)]
        for start in range(0, len(names), 1000):  # DeleteObjects takes 1,000 keys at a time
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": name} for name in names[start:start + 1000]], "Quiet": True})
        shutil.rmtree(self.work_root / hashlib.sha256(key.encode()).hexdigest()[:32], ignore_errors=True)


def get_storage(settings: "Settings") -> Storage:
    """The backend the settings name: local disk under the data directory, or an S3 bucket."""
    if not settings.storage_url:
        return LocalStorage(Path(settings.data_dir) / "store")
    url = urlparse(settings.storage_url)
    if url.scheme != "s3" or not url.netloc:
        raise ValueError(f"COFT_STORAGE_URL must be s3://bucket[/prefix], got {settings.storage_url!r}")
    cache = LocalCache(Path(settings.cache_dir), settings.cache_max_bytes)
    return S3Storage(url.netloc, url.path, cache, endpoint_url=settings.s3_endpoint_url)


# Keys, in one place, so the API and the worker agree on the layout.
def dataset_dir(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def dataset_archive(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/archive"


def dataset_parts(dataset_id: str) -> str:
    """A dataset uploaded in parts: one archive per part under here, in upload order by name."""
    return f"datasets/{dataset_id}/parts"


def new_part_key(dataset_id: str) -> str:
    return f"{dataset_parts(dataset_id)}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def job_dir(job_id: str) -> str:
    return f"jobs/{job_id}"


def job_checkpoints(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


def job_predictions(job_id: str) -> str:
    return f"jobs/{job_id}/predictions.json"


def classifier_dir(classifier_id: str) -> str:
    return f"classifiers/{classifier_id}"


def onnx_export_key(artifact_key: str) -> str:
    """The ONNX export of one artifact version: made once, deleted with the classifier."""
    return f"{artifact_key}.onnx.zip"


def new_artifact_key(classifier_id: str) -> str:
    """Where a new version of a classifier's artifact goes: a key never used before."""
    return f"{classifier_dir(classifier_id)}/{time.time_ns():x}"

"""Where datasets, checkpoints and classifier artifacts live.

Callers speak in keys (`datasets/ds_x/archive`, `classifiers/clf_x`), never in paths, so an
S3-compatible backend can replace `LocalStorage` without touching them. The interface is shaped
for that: whole-object writes from a stream, reads through a local copy (`local_file`,
`local_dir`: a no-op for local disk, a download for S3), and directories (checkpoints) that are
written locally and uploaded when the block ends (`work_dir`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol


class Storage(Protocol):
    def write(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Store an object atomically; returns (size in bytes, sha256 hex)."""

    def open(self, key: str) -> BinaryIO: ...

    def local_file(self, key: str) -> AbstractContextManager[Path]:
        """A local path to the object for the duration of the block."""

    def local_dir(self, key: str) -> AbstractContextManager[Path]:
        """A local, read-only view of everything under `key/`."""

    def work_dir(self, key: str) -> AbstractContextManager[Path]:
        """A writable local directory whose contents end up under `key/` (kept between blocks)."""

    def put_dir(self, key: str, source: Path) -> int:
        """Store a local directory's files under `key/` (replacing what was there); returns bytes."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Remove an object or everything under `key/`; missing keys are fine."""


class LocalStorage:
    """Keys are paths under one root directory (COFT_DATA_DIR/store)."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        # Keys are built by our code from generated ids, but a traversal here would be a disaster.
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or any(p in ("..", ".", "") for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def write(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def open(self, key: str) -> BinaryIO:
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
    def work_dir(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        path.mkdir(parents=True, exist_ok=True)
        yield path

    def put_dir(self, key: str, source: Path) -> int:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Readers see the old directory or the new one, never a half-written or half-deleted one:
        # the copy is made under a hidden name, then swapped in. On Linux the swap is one atomic
        # exchange, so the key never disappears; elsewhere it is two renames, with a moment between
        # them where the key is missing (a reader then gets "not found", never a partial artifact).
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        retired = path.parent / f"{staging.name}.old"
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            exchanged = path.exists() and _exchange(staging, path)  # staging then holds the old version
            if not exchanged:
                if path.exists():
                    path.rename(retired)
                staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(retired, ignore_errors=True)
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or filesystem cannot, or
    where `b` is gone by now (deleted meanwhile: the caller then renames `a` into place)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT):
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


# renameat2(2) with RENAME_EXCHANGE (Linux 3.15+, glibc 2.28+): os has no wrapper for it.
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def get_storage(data_dir: Path) -> Storage:
    return LocalStorage(Path(data_dir) / "store")


# Keys, in one place, so the API and the worker agree on the layout.
def dataset_dir(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def dataset_archive(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/archive"


def job_dir(job_id: str) -> str:
    return f"jobs/{job_id}"


def job_checkpoints(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints"


def job_predictions(job_id: str) -> str:
    return f"jobs/{job_id}/predictions.json"


def classifier_dir(classifier_id: str) -> str:
    return f"classifiers/{classifier_id}"

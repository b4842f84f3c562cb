"""Archive bytes for the tests that feed hostile and ordinary uploads to coft.data and the service."""

from __future__ import annotations

import io
import tarfile
from typing import Iterable


def make_tar(files: dict[str, bytes], mode: str = "w:gz", extra: Iterable[tarfile.TarInfo] = ()) -> bytes:
    """A tar archive of `files` (name -> bytes), then the bare `extra` members (links, directories)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info)
    return buffer.getvalue()

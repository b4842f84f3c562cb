"""Turn what a user hands us (a folder, a zip, a tar) into an in-memory set of images, safely.

The HTTP service feeds uploads from strangers straight into this module, so everything here is
written for hostile input: archives are read member by member into memory (nothing is ever
extracted to disk, so path tricks cannot write anywhere), sizes and entry counts are bounded
before work is done, and every image is decoded once up front so a bad file becomes a
`RejectedFile` with a reason instead of a crash hours later in training. Problems with the
archive as a whole raise `DataError`, whose `code` the service maps to an API error type.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import operator
import os
import posixpath
import stat
import tarfile
import threading
import unicodedata
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from PIL import Image, ImageOps

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
# Refused rather than ignored: a user who zipped zips would otherwise get "no usable images".
_NESTED_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".tbz2", ".txz", ".7z", ".rar")
# OS clutter that users never meant as data; skipped without a rejection entry (like hidden files).
_CLUTTER = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
# Only decoders matching IMAGE_EXTENSIONS: Pillow can also open EPS (which runs Ghostscript),
# PSD and dozens of rarely fuzzed formats, and none of those belong in a dataset upload.
Image.init()
_PIL_FORMATS = tuple(f for f in ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF") if f in Image.OPEN)
# Ratio checks ignore amounts below this: a 10 KB solid-colour BMP may deflate 500x yet is no bomb,
# and the absolute byte limits already bound what many small members can add up to.
_RATIO_FLOOR_BYTES = 2**20
# Tar headers, pax/long-name records and padding, allowed per entry on top of member data.
_TAR_OVERHEAD_PER_ENTRY = 4096
_DECOMPRESSORS: dict[bytes, Callable[[BinaryIO], BinaryIO]] = {
    b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    b"BZh": lambda f: bz2.BZ2File(f),
    b"\xfd7zXZ\x00": lambda f: lzma.LZMAFile(f),
}
# What the standard library raises on garbled archives (ValueError: e.g. a negative seek from a
# garbled zip offset; DataError is a ValueError too, so callers re-raise it before catching these).
_CORRUPT_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


def default_threads() -> int:
    """Every core this process may run on (a container's or taskset's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class DataLimits:
    max_image_pixels: int = 40_000_000  # per image, width*height; checked before pixels are allocated
    max_file_bytes: int = 50 * 2**20  # one image file / archive member
    max_total_bytes: int = 2 * 2**30  # sum of uncompressed member sizes in an archive
    max_entries: int = 100_000  # archive members (files + dirs), or folder entries walked
    max_compression_ratio: float = 200.0  # uncompressed/compressed, per zip member and overall
    max_images: int = 100_000


class DataError(ValueError):
    """Input that cannot be used at all. `code` is a stable machine-readable string."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


@dataclass(frozen=True)
class RejectedFile:
    path: str  # relative to the root, POSIX separators
    reason: str  # short human sentence, shown to the user as is


class _Unusable(Exception):
    """One file cannot be used; carries the reason that ends up in RejectedFile."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_Source = bytes | str | Image.Image  # archive member bytes, a file path, or an in-memory image


class ImageSet(Sequence[Image.Image]):
    """Unlabelled images in a stable order (sorted by relative path, except `from_images`).

    Pixels are decoded on `__getitem__` from bytes kept in memory (archives) or from the file
    (folders), so a large set costs its compressed size, not its decoded size. Always RGB.
    """

    def __init__(
        self,
        names: Sequence[str],
        sources: Sequence[_Source],
        rejected: Sequence[RejectedFile] = (),
        limits: DataLimits = DataLimits(),
    ):
        """Internal: use `open_images` or `from_images`."""
        if len(names) != len(sources):
            raise ValueError(f"{len(names)} names for {len(sources)} images")
        self.names = list(names)
        self.rejected = list(rejected)
        self._sources = list(sources)
        self._limits = limits

    @classmethod
    def from_images(cls, images: Sequence[Image.Image], names: Sequence[str] | None = None) -> ImageSet:
        """Wrap already-decoded images, keeping the caller's order (predictions map back by index)."""
        if names is None:
            names = [f"{i:06d}" for i in range(len(images))]
        return cls(names, list(images))

    def __len__(self) -> int:
        return len(self._sources)

    def __getitem__(self, i: int) -> Image.Image:  # type: ignore[override]
        return self.decode(i)

    def decode(self, i: int, at_least: tuple[int, int] | None = None) -> Image.Image:
        """Image i in RGB. With `at_least` (width, height), a JPEG may be decoded at a reduced scale
        (libjpeg's DCT scaling) that still covers that size: a 4000x3000 photo needed at 258 pixels
        decodes about ten times faster."""
        source = self._sources[operator.index(i)]
        if isinstance(source, Image.Image):
            return source.convert("RGB")  # always a copy, so callers cannot mutate our image
        try:
            return _decode(source, self._limits, at_least)
        except _Unusable as e:  # it decoded when validated, so the file changed underneath us
            raise OSError(f"{self.names[i]}: {e.reason} (changed since it was opened?)") from None

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images, {len(self.rejected)} rejected)"

    def _subset(self, indices: Sequence[int], more_rejected: Sequence[RejectedFile]) -> ImageSet:
        rejected = sorted([*self.rejected, *more_rejected], key=lambda r: r.path)
        return ImageSet([self.names[i] for i in indices], [self._sources[i] for i in indices], rejected, self._limits)


@dataclass(frozen=True)
class LabelledImageSet:
    """A labelled evaluation set: `labels[i]` indexes `class_names` for `images[i]`."""

    images: ImageSet
    labels: list[int]
    class_names: list[str]


def open_images(source: str | os.PathLike | bytes | BinaryIO | Sequence[str | os.PathLike], *,
                limits: DataLimits = DataLimits(), verify: bool = True) -> ImageSet:
    """A folder (recursive; hidden files/dirs like .DS_Store, __MACOSX skipped silently), a zip, or
    a tar (optionally gzip/bzip2/xz compressed), given as a path, raw bytes, or a binary file object
    (read from its start). Archives are recognised by content, not by file name. A list of paths is
    one set made of all of them (a dataset uploaded in parts); a path seen twice is a duplicate.

    Every candidate file is decoded here (in parallel threads), so bad files land in `rejected`
    with a reason. `verify=False` checks only each file's header: for a dataset validated before
    (the service validates on upload), whose pixels the run decodes once anyway.
    Archive-level hostility raises DataError; so does a result without a single usable image.
    """
    collector = _Collector(limits)
    for one in (source if isinstance(source, (list, tuple)) else [source]):
        _collect(one, collector)
    return collector.image_set(verify)


class ArchiveIndex:
    """The images of stored archives (a dataset's one archive, or its parts), by position, read one
    at a time: `open_images`' order and names, but what stays in memory is each archive's directory,
    not its bytes. For the few images a viewer asks for (the dashboard's thumbnails), where opening
    the set again would read the whole archive for each one.

    A zip and a plain tar are read at the member's offset; a compressed tar has none, so each read
    decompresses up to its member. Reads are serialised (tarfile is not thread-safe).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, limits: DataLimits = DataLimits()):
        self.names = open_images(list(paths), limits=limits, verify=False).names  # its bytes are dropped here
        self._limits = limits
        self._archives: list[zipfile.ZipFile | tarfile.TarFile] = []
        # path -> (the archive's own way to open a member, the member): ZipFile.open or TarFile.extractfile
        self._members: dict[str, tuple[Callable[[Any], BinaryIO], zipfile.ZipInfo | tarfile.TarInfo]] = {}
        self._lock = threading.Lock()
        for path in paths:
            # Tar (plain or compressed) or else zip, as open_images told them apart when it accepted them.
            if tarfile.is_tarfile(path):
                tar = tarfile.open(path, "r:*")
                entries = [(member.name, tar.extractfile, member) for member in tar.getmembers()]
                self._archives.append(tar)
            else:
                archive = zipfile.ZipFile(path)
                entries = [(info.filename, archive.open, info) for info in archive.infolist()]
                self._archives.append(archive)
            for name, open_member, entry in entries:  # the first of a repeated path is the one open_images kept
                self._members.setdefault(_member_path(name), (open_member, entry))

    def __len__(self) -> int:
        return len(self.names)

    def decode(self, i: int, at_least: tuple[int, int] | None = None) -> Image.Image:
        """Image i in RGB, as `ImageSet.decode` gives it."""
        name = self.names[operator.index(i)]
        open_member, entry = self._members[name]
        with self._lock, open_member(entry) as member:
            data = member.read(self._limits.max_file_bytes + 1)
        try:
            return _decode(data, self._limits, at_least)
        except _Unusable as e:
            raise OSError(f"{name}: {e.reason} (changed since it was opened?)") from None

    def close(self) -> None:
        for archive in self._archives:
            archive.close()


def _collect(source: str | os.PathLike | bytes | BinaryIO, collector: "_Collector") -> None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        _collect_archive(io.BytesIO(source), collector)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            _collect_folder(path, collector)
        elif not path.exists():
            raise DataError("not-found", f"{path} does not exist")
        elif not path.is_file():
            raise DataError("unsupported-format", f"{path} is neither a folder nor a file")
        else:
            with path.open("rb") as f:
                _collect_archive(f, collector)
    elif hasattr(source, "read"):
        if not getattr(source, "seekable", lambda: False)():
            source = io.BytesIO(source.read())  # zip needs random access
        source.seek(0)
        _collect_archive(source, collector)
    else:
        raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")


def normalise_class_name(name: str) -> str:
    """Folder names and user-typed class names meet here: case, '_'/'-' and spacing do not count.

    NFC because macOS writes decomposed Unicode in zip names ('é' as 'e' + accent).
    """
    name = unicodedata.normalize("NFC", name).replace("_", " ").replace("-", " ")
    return " ".join(name.split()).casefold()


MAX_CLASSES = 1000
MAX_CLASS_NAME_CHARS = 200


def check_class_names(names: Sequence[str]) -> list[str]:
    """The names stripped of surrounding spaces, or ValueError saying what is wrong with them: the
    one rule for class names, in the library, the CLI and the API alike.

    Distinct means distinct after `normalise_class_name` ("Sea_lion" == "sea lion"), the rule an
    evaluation set's folders are matched by, so two classes can never claim one folder.
    """
    names = [str(n).strip() for n in names]
    if len(names) < 2:
        raise ValueError(f"at least two class names are needed, got {len(names)}")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"at most {MAX_CLASSES} class names, got {len(names)}")
    if any(not n or len(n) > MAX_CLASS_NAME_CHARS for n in names):
        raise ValueError(f"class names must not be blank, and at most {MAX_CLASS_NAME_CHARS} characters")
    seen: dict[str, str] = {}
    for name in names:
        if (key := normalise_class_name(name)) in seen:
            raise ValueError(f"class names must be distinct: {seen[key]!r} and {name!r} are the same class "
                             "(case, spaces, _ and - do not count)")
        seen[key] = name
    return names


def open_labelled_images(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    limits: DataLimits = DataLimits(),
    class_names: Sequence[str] | None = None,
    verify: bool = True,
) -> LabelledImageSet:
    """`root/<class name>/**/image`. If the root holds a single folder that itself contains only
    folders (a user zipped the dataset folder), descend into it once. With `class_names`, folders
    are matched to them after `normalise_class_name`; a folder matching none is a DataError, since
    silently dropping it would skew the evaluation. Files directly in the root are rejected.
    """
    images = open_images(source, limits=limits, verify=verify)
    wanted: dict[str, int] | None = None
    if class_names is not None:
        wanted = {normalise_class_name(n): i for i, n in enumerate(class_names)}
        if len(wanted) != len(class_names):
            raise ValueError(f"class names are not distinct after normalisation: {list(class_names)}")
    prefix = _wrapper_folder([*images.names, *(r.path for r in images.rejected)], wanted)

    kept: list[tuple[int, str]] = []  # (index into images, class folder)
    orphans: list[RejectedFile] = []
    for i, name in enumerate(images.names):
        folder, sep, _ = name[len(prefix) :].partition("/")
        if sep:
            kept.append((i, folder))
        else:
            orphans.append(RejectedFile(name, "not inside a class folder"))
    if not kept:
        raise DataError("no-usable-images", "no images inside class folders (expected root/<class>/<image>)")
    folders = sorted({folder for _, folder in kept})
    if wanted is None:
        # Without given names, folders differing only in case or spacing stay distinct classes.
        class_names = folders
        wanted = {folder: i for i, folder in enumerate(folders)}
        labels = [wanted[folder] for _, folder in kept]
    else:
        unknown = [f for f in folders if normalise_class_name(f) not in wanted]
        if unknown:
            raise DataError("unknown-class", f"folders {unknown} match none of the classes {list(class_names)}")
        labels = [wanted[normalise_class_name(folder)] for _, folder in kept]
    subset = images._subset([i for i, _ in kept], orphans)
    return LabelledImageSet(subset, labels, list(class_names))


def _wrapper_folder(paths: list[str], class_keys: dict[str, int] | None) -> str:
    """The 'dataset/' prefix to strip when everything sits in one folder made only of folders."""
    if not paths or any("/" not in p for p in paths):
        return ""
    tops = {p.split("/", 1)[0] for p in paths}
    if len(tops) != 1 or any("/" not in p.split("/", 1)[1] for p in paths):
        return ""
    top = tops.pop()
    if class_keys is not None and normalise_class_name(top) in class_keys:
        return ""  # a single-class set whose class folder has sub-folders
    return top + "/"


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, *, limits: DataLimits = DataLimits()) -> Image.Image:
    """One image from its bytes (a predict request's upload), with the same checks as a dataset's.

    Raises DataError("unusable-image", reason) when it cannot be used.
    """
    try:
        return _decode(bytes(data), limits)
    except _Unusable as unusable:
        raise DataError("unusable-image", unusable.reason) from None


def _decode(source: bytes | str, limits: DataLimits, at_least: tuple[int, int] | None = None,
            header_only: bool = False) -> Image.Image | None:
    """Fully decode one image to RGB, or raise _Unusable with a reason a user can act on.

    `at_least` (width, height) lets a JPEG decode at the smallest DCT scale that still covers it
    (in either orientation, as EXIF rotation comes after); the whole file is still read and checked.
    `header_only` checks the format and size and returns None, decoding nothing.
    """
    try:
        fp: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as e:
        raise _Unusable(f"unreadable file ({e.strerror or e})") from None
    with fp:
        try:
            with Image.open(fp, formats=_PIL_FORMATS) as img:
                # Checked on the header, before load() allocates anything; Pillow's own global
                # MAX_IMAGE_PIXELS guard still applies too, and we never loosen it.
                width, height = img.size
                if width * height > limits.max_image_pixels:
                    raise _Unusable(f"image too large ({width}x{height} = {width * height} pixels)")
                if header_only:
                    return None
                if at_least is not None:
                    side = max(at_least)
                    img.draft(img.mode, (side, side))  # a no-op for formats other than JPEG
                img.load()  # LOAD_TRUNCATED_IMAGES stays False, so truncation raises here
                rgb = img.convert("RGB")
                ImageOps.exif_transpose(rgb, in_place=True)  # phone photos store rotation in EXIF
                return rgb
        except _Unusable:
            raise
        except Image.UnidentifiedImageError:
            raise _Unusable("not a decodable image (content is not JPEG/PNG/BMP/GIF/WebP/TIFF)") from None
        except Image.DecompressionBombError:
            raise _Unusable("image too large (decompression bomb)") from None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types on hostile input
            if isinstance(e, EOFError) or "truncated" in str(e).lower():
                raise _Unusable("truncated image") from None
            raise _Unusable(f"corrupt image ({type(e).__name__}: {str(e)[:100]})") from None


# --------------------------------------------------------------------------- collecting


class _Collector:
    """The per-file policy shared by folders and archives, so both behave the same."""

    def __init__(self, limits: DataLimits):
        self.limits = limits
        self.candidates: list[tuple[str, bytes | str]] = []
        self.accepted: dict[str, bytes | str] = {}
        self.rejected: list[RejectedFile] = []
        self._seen: set[str] = set()

    def _decodes(self, source: bytes | str) -> str | None:
        try:
            _decode(source, self.limits, at_least=(1, 1))
        except _Unusable as e:
            return e.reason
        return None

    def _header_fits(self, source: bytes | str) -> str | None:
        try:
            _decode(source, self.limits, header_only=True)
        except _Unusable as e:
            return e.reason
        return None

    def wants(self, path: str, in_archive: bool) -> bool:
        """Whether to read and decode `path`; records why not, unless it is clutter."""
        if any(_is_clutter(part) for part in path.split("/")):
            return False
        lower = path.lower()
        if in_archive and lower.endswith(_NESTED_ARCHIVE_SUFFIXES):
            raise DataError("nested-archive", f"{path}: archives inside archives are not unpacked")
        if path in self._seen:  # repeated zip entry, or 'a/b.png' next to 'a/./b.png'
            self.reject(path, "duplicate path in archive")
            return False
        self._seen.add(path)
        if posixpath.splitext(lower)[1] not in IMAGE_EXTENSIONS:
            self.reject(path, "not an image file")
            return False
        return True

    def add(self, path: str, source: bytes | str) -> None:
        self.candidates.append((path, source))

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append(RejectedFile(path, reason))

    def image_set(self, verify: bool = True) -> ImageSet:
        """Check every candidate, in parallel threads: decoded whole (`verify`, at the smallest JPEG
        scale, which still reads and checks every byte), or only its header."""
        check = self._decodes if verify else self._header_fits
        with ThreadPoolExecutor(max_workers=default_threads()) as pool:
            reasons = list(pool.map(check, [source for _, source in self.candidates]))
        for (path, source), reason in zip(self.candidates, reasons):
            if reason is None:
                self.accepted[path] = source
            else:
                self.reject(path, reason)
        if len(self.accepted) > self.limits.max_images:
            raise DataError("too-many-images", f"more than {self.limits.max_images} images")
        rejected = sorted(self.rejected, key=lambda r: r.path)
        if not self.accepted:
            if not rejected:
                raise DataError("no-usable-images", "no image files found")
            shown = "; ".join(f"{r.path}: {r.reason}" for r in rejected[:5])
            more = f"; and {len(rejected) - 5} more" if len(rejected) > 5 else ""
            raise DataError("no-usable-images", f"no usable images, {len(rejected)} files rejected: {shown}{more}")
        names = sorted(self.accepted)
        return ImageSet(names, [self.accepted[n] for n in names], rejected, self.limits)


def _is_clutter(name: str) -> bool:
    return name.startswith(".") or name in _CLUTTER


def _collect_folder(root: Path, collector: _Collector) -> None:
    limits = collector.limits
    root_real = os.path.realpath(root)
    entries = 0

    def unreadable_folder(e: OSError) -> None:
        collector.reject(_relative(str(e.filename), "", root_real), f"unreadable folder ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(root_real, onerror=unreadable_folder):  # links not followed
        dirnames[:] = sorted(d for d in dirnames if not _is_clutter(d))
        entries += len(dirnames) + len(filenames)
        if entries > limits.max_entries:
            raise DataError("too-many-entries", f"more than {limits.max_entries} entries in {root}")
        for name in sorted(dirnames):
            if os.path.islink(os.path.join(dirpath, name)):
                collector.reject(_relative(dirpath, name, root_real), "link to a folder (not followed)")
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = _relative(dirpath, name, root_real)
            if not collector.wants(rel, in_archive=False):
                continue
            try:
                if os.path.islink(full):
                    full = os.path.realpath(full)
                    if os.path.commonpath([root_real, full]) != root_real:
                        collector.reject(rel, "symbolic link pointing outside the folder (not followed)")
                        continue
                st = os.stat(full)
            except OSError as e:
                collector.reject(rel, f"unreadable file ({e.strerror or e})")
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block forever on open
                collector.reject(rel, "not a regular file")
            elif st.st_size > limits.max_file_bytes:
                collector.reject(rel, f"file too large ({st.st_size} bytes)")
            else:
                collector.add(rel, full)


def _relative(dirpath: str, name: str, root: str) -> str:
    return Path(os.path.relpath(os.path.join(dirpath, name), root)).as_posix()


def _member_path(name: str) -> str:
    """The member's path relative to the archive root, or DataError if it would leave the root.

    Backslashes count as separators because Windows tools write them into zip names.
    """
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        raise DataError("absolute-path", f"archive member with absolute path: {name!r}")
    norm = posixpath.normpath(name)  # './a.png' (from `tar -C dir .`) -> 'a.png'; the root itself -> '.'
    if norm == ".." or norm.startswith("../"):
        raise DataError("path-traversal", f"archive member escapes the archive root: {name!r}")
    return norm


def _check_sizes(path: str, size: int, total: int, limits: DataLimits) -> None:
    if size > limits.max_file_bytes:
        raise DataError("archive-too-large", f"{path}: {size} bytes exceeds the {limits.max_file_bytes}-byte file limit")
    if total > limits.max_total_bytes:
        raise DataError("archive-too-large", f"archive contents exceed {limits.max_total_bytes} bytes")


def _check_ratio(what: str, uncompressed: int, compressed: int, limits: DataLimits) -> None:
    if uncompressed > _RATIO_FLOOR_BYTES and (
        compressed <= 0 or uncompressed / compressed > limits.max_compression_ratio
    ):
        raise DataError("compression-ratio", f"{what} expands more than {limits.max_compression_ratio:g}x (zip bomb?)")


def _collect_archive(raw: BinaryIO, collector: _Collector) -> None:
    head = raw.read(512)
    raw.seek(0)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return _collect_zip(raw, collector)
    for magic, decompress in _DECOMPRESSORS.items():
        if head.startswith(magic):
            try:
                is_tar = _is_tar_header(decompress(raw).read(512))
            except _CORRUPT_ERRORS as e:
                raise DataError("corrupt-archive", f"cannot decompress: {e}") from None
            raw.seek(0)
            if not is_tar:
                raise DataError("unsupported-format", "a compressed file that is not a tar archive")
            return _collect_tar(decompress(raw), raw, collector)
    if _is_tar_header(head):
        return _collect_tar(raw, raw, collector)
    if zipfile.is_zipfile(raw):  # zip with a prefix, e.g. self-extracting
        raw.seek(0)
        return _collect_zip(raw, collector)
    raise DataError("unsupported-format", "expected a folder, a zip archive or a tar archive")


def _is_tar_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "replace")  # validates the header checksum
        return True
    except tarfile.HeaderError:
        return False


def _collect_zip(raw: BinaryIO, collector: _Collector) -> None:
    limits = collector.limits
    try:
        archive = zipfile.ZipFile(raw)
    except (*_CORRUPT_ERRORS, NotImplementedError) as e:  # e.g. "zip file version 8.0"
        raise DataError("corrupt-archive", f"unreadable zip archive: {e}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_entries:
            raise DataError("too-many-entries", f"{len(infos)} entries, more than {limits.max_entries}")
        members: list[tuple[str, zipfile.ZipInfo]] = []
        total = compressed = 0
        for info in infos:  # validate everything before decoding anything
            path = _member_path(info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DataError("link-in-archive", f"symbolic link in archive: {info.filename!r}")
            if info.is_dir():
                continue
            total += info.file_size
            compressed += info.compress_size
            _check_sizes(path, info.file_size, total, limits)
            _check_ratio(path, info.file_size, info.compress_size, limits)
            if collector.wants(path, in_archive=True):
                members.append((path, info))
        _check_ratio("archive", total, compressed, limits)
        for path, info in members:
            try:
                # Bounded even though zipfile stops at the declared size: do not trust headers alone.
                with archive.open(info) as member:
                    data = member.read(limits.max_file_bytes + 1)
            except (RuntimeError, NotImplementedError) as e:  # encrypted, unknown compression
                collector.reject(path, f"unreadable archive member ({e})")
                continue
            except _CORRUPT_ERRORS as e:
                raise DataError("corrupt-archive", f"{path}: {e}") from None
            _check_sizes(path, len(data), 0, limits)
            collector.add(path, data)


class _BoundedStream:
    """Counts the bytes tarfile pulls out of a (decompressing) stream, so a gzip bomb is stopped
    early: tarfile itself reads pax and long-name headers whole, before we see any member."""

    def __init__(self, stream: BinaryIO, raw: BinaryIO, limits: DataLimits):
        self._stream, self._raw, self._limits = stream, raw, limits
        self._budget = limits.max_total_bytes + _TAR_OVERHEAD_PER_ENTRY * (limits.max_entries + 1)
        self._count = 0

    def read(self, n: int = -1) -> bytes:
        left = self._budget - self._count + 1
        data = self._stream.read(left if n < 0 else min(n, left))
        self._count += len(data)
        if self._count > self._budget:
            raise DataError("archive-too-large", f"archive expands to more than {self._budget} bytes")
        if self._stream is not self._raw:  # raw.tell() is how much compressed input was consumed
            _check_ratio("archive", self._count, self._raw.tell(), self._limits)
        return data


def _collect_tar(stream: BinaryIO, raw: BinaryIO, collector: _Collector) -> None:
    limits = collector.limits
    entries = total = 0
    try:
        # Stream mode ("r|"): one pass, members in order, no seeking, no member list built up front.
        with tarfile.open(fileobj=_BoundedStream(stream, raw, limits), mode="r|", errors="replace") as archive:
            for member in archive:
                entries += 1
                if entries > limits.max_entries:
                    raise DataError("too-many-entries", f"more than {limits.max_entries} entries")
                path = _member_path(member.name)
                if member.issym() or member.islnk() or member.isdev():
                    raise DataError("link-in-archive", f"link or device in archive: {member.name!r}")
                if not member.isreg():
                    continue
                total += member.size  # skipped members count too: their bytes are still decompressed
                _check_sizes(path, member.size, total, limits)
                if collector.wants(path, in_archive=True):
                    fileobj = archive.extractfile(member)
                    data = fileobj.read(limits.max_file_bytes + 1) if fileobj else b""
                    collector.add(path, data)
    except DataError:
        raise
    except _CORRUPT_ERRORS as e:
        raise DataError("corrupt-archive", f"unreadable tar archive: {e}") from None

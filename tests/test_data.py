"""Tests for coft.data: every fixture is built in tmp_path at test time, nothing binary is committed."""

import gzip
import io
import os
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import coft.data
from coft.data import (
    DataError,
    DataLimits,
    ImageSet,
    normalise_class_name,
    open_images,
    open_labelled_images,
)
from tests.archives import make_tar


def encode(fmt: str, size=(16, 16), color=None, seed=0) -> bytes:
    """Noise by default, so that cutting the file in half really cuts pixel data."""
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
    else:
        img = Image.new("RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


PNG = encode("PNG", color=(255, 0, 0))
JPEG = encode("JPEG", size=(64, 64))


def write_tree(root, files: dict[str, bytes]):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def make_zip(files: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed up), like a decompression bomb."""
    data = bytearray(encode("PNG", size=(1, 1), color=(0, 0, 0)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def code_of(source, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        open_images(source, **kwargs)
    return info.value.code


def reasons(images: ImageSet) -> dict[str, str]:
    return {r.path: r.reason for r in images.rejected}


# --------------------------------------------------------------------------- folders


def test_flat_folder_in_sorted_order_as_rgb(tmp_path):
    write_tree(tmp_path, {"c.bmp": encode("BMP"), "a.png": PNG, "b.jpg": JPEG, "d.gif": encode("GIF")})
    Image.new("L", (5, 7), 128).save(tmp_path / "e.tif")
    images = open_images(tmp_path)
    assert images.names == ["a.png", "b.jpg", "c.bmp", "d.gif", "e.tif"]
    assert len(images) == 5 and images.rejected == []
    assert all(img.mode == "RGB" for img in images)
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    assert images[-1].size == (5, 7)
    assert open_images(str(tmp_path)).names == images.names  # stable across calls and path types


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (4, 2))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees", as phones write it
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert open_images(tmp_path)[0].size == (2, 4)


def test_nested_folder_skips_hidden_files_and_clutter(tmp_path):
    write_tree(tmp_path, {
        "b/x/y.png": PNG, "a.png": PNG, ".hidden.png": PNG, ".git/z.png": PNG,
        "__MACOSX/._a.png": b"junk", ".DS_Store": b"junk", "b/Thumbs.db": b"junk",
    })
    images = open_images(tmp_path)
    assert images.names == ["a.png", "b/x/y.png"]
    assert images.rejected == []


def test_folder_symlink_outside_is_not_followed(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG)
    root = write_tree(tmp_path / "data", {"a.png": PNG})
    (root / "link.png").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "a.png")
    (root / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(root / "pipe.png")  # opening a FIFO would hang forever
    images = open_images(root)
    assert images.names == ["a.png", "inner.png"]
    assert "outside the folder" in reasons(images)["link.png"]
    assert "not followed" in reasons(images)["dirlink"]
    assert reasons(images)["pipe.png"] == "not a regular file"


def test_unreadable_file_is_rejected(tmp_path, monkeypatch):
    write_tree(tmp_path, {"a.png": PNG, "locked.png": PNG})

    def fake_open(path, mode="r", *args, **kwargs):  # chmod 000 does not stop root, so simulate it
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(coft.data, "open", fake_open, raising=False)
    images = open_images(tmp_path)
    assert images.names == ["a.png"]
    assert reasons(images)["locked.png"] == "unreadable file (Permission denied)"


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
@pytest.mark.parametrize("form", ["path", "bytes", "fileobj"])
def test_archives_from_path_bytes_and_file_object(tmp_path, kind, form):
    files = {"z/b.png": PNG, "a.jpg": JPEG, "./c.png": PNG, ".DS_Store": b"x"}
    data = make_zip(files) if kind == "zip" else make_tar(files, "w" if kind == "tar" else "w:gz")
    path = tmp_path / "upload.bin"  # deliberately no telling extension: detected by content
    path.write_bytes(data)
    fileobj = open(path, "rb")
    fileobj.seek(7)  # the service hands over a spooled file wherever its cursor happens to be
    source = {"path": path, "bytes": data, "fileobj": fileobj}[form]
    with fileobj:
        images = open_images(source)
    assert images.names == ["a.jpg", "c.png", "z/b.png"]
    assert images[1].getpixel((3, 3)) == (255, 0, 0)
    assert images[0].size == (64, 64)


def test_bad_images_are_rejected_with_reasons(tmp_path):
    write_tree(tmp_path, {
        "good.png": PNG,
        "really_png.jpg": PNG,  # decoded by content, so a wrong extension is fine
        "trunc.jpg": JPEG[: len(JPEG) // 2],
        "trunc.png": encode("PNG", size=(64, 64))[:2000],
        "spoof.png": b"this is just text, not a picture\n" * 20,
        "notes.txt": b"hello",
        "empty.jpg": b"",
    })
    images = open_images(tmp_path)
    assert images.names == ["good.png", "really_png.jpg"]
    assert reasons(images) == {
        "empty.jpg": reasons(images)["empty.jpg"],
        "notes.txt": "not an image file",
        "spoof.png": reasons(images)["spoof.png"],
        "trunc.jpg": "truncated image",
        "trunc.png": "truncated image",
    }
    assert reasons(images)["spoof.png"].startswith("not a decodable image")
    assert reasons(images)["empty.jpg"].startswith("not a decodable image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_without_verify_only_headers_are_checked(tmp_path):
    """A dataset validated on upload: a job reads headers only, and a broken file shows when decoded."""
    write_tree(tmp_path, {"good.png": PNG, "trunc.jpg": JPEG[: len(JPEG) // 2], "spoof.png": b"text" * 50,
                          "bomb.png": bomb_png(100_000, 100_000)})
    images = open_images(tmp_path, verify=False)
    assert images.names == ["good.png", "trunc.jpg"]  # a truncated body has a good header
    assert set(reasons(images)) == {"spoof.png", "bomb.png"}
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(OSError, match="truncated image"):
        images[1]


def test_a_large_jpeg_decodes_at_a_reduced_scale_that_still_covers_the_request(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)).resize((2000, 1500))
    photo.save(tmp_path / "photo.jpg", quality=90)
    images = open_images(tmp_path)
    assert images[0].size == (2000, 1500)
    reduced = images.decode(0, at_least=(300, 300))
    assert reduced.size == (500, 375)  # 1/4 scale: the smallest whose short side still covers 300
    full = np.asarray(images[0].resize(reduced.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(reduced, dtype=np.float32) - full).mean() < 3.0  # the same picture


def test_decompression_bomb_is_rejected_without_decoding(tmp_path):
    write_tree(tmp_path, {"bomb.png": bomb_png(100_000, 100_000), "big.png": bomb_png(8000, 8000), "ok.png": PNG})
    images = open_images(tmp_path)  # 1e10 pixels at 3 bytes each would not fit in memory
    assert images.names == ["ok.png"]
    assert reasons(images)["bomb.png"].startswith("image too large")
    assert reasons(images)["big.png"] == "image too large (8000x8000 = 64000000 pixels)"
    assert code_of(tmp_path, limits=DataLimits(max_image_pixels=255)) == "no-usable-images"


@pytest.mark.parametrize("name, code", [
    ("../evil.png", "path-traversal"),
    ("a/../../evil.png", "path-traversal"),
    ("..\\evil.png", "path-traversal"),
    ("/tmp/evil.png", "absolute-path"),
    ("C:/evil.png", "absolute-path"),
])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_escaping_the_root_is_refused(tmp_path, name, code, kind):
    files = {"ok.png": PNG, name: PNG}
    data = make_zip(files) if kind == "zip" else make_tar(files)
    assert code_of(data) == code
    assert not (tmp_path.parent / "evil.png").exists() and not os.path.exists("/tmp/evil.png")


def test_harmless_dotdot_inside_the_root_is_fine():
    assert open_images(make_zip({"a/../b.png": PNG})).names == ["b.png"]


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_tar_links_and_devices_are_refused(kind):
    link = tarfile.TarInfo("link.png")
    link.type, link.linkname = kind, "ok.png"
    assert code_of(make_tar({"ok.png": PNG}, extra=[link])) == "link-in-archive"


def test_zip_symlink_is_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.png", PNG)
        info = zipfile.ZipInfo("link.png")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    assert code_of(buf.getvalue()) == "link-in-archive"


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_entries(kind):
    files = {f"d/{i}.png": PNG for i in range(5)}
    data = make_zip(files) if kind == "zip" else make_tar(files)
    assert code_of(data, limits=DataLimits(max_entries=4)) == "too-many-entries"
    assert len(open_images(data, limits=DataLimits(max_entries=5))) == 5


def test_too_many_entries_in_folder(tmp_path):
    write_tree(tmp_path, {f"{i}.png": PNG for i in range(4)})
    assert code_of(tmp_path, limits=DataLimits(max_entries=3)) == "too-many-entries"


def test_too_many_images():
    data = make_zip({f"{i}.png": PNG for i in range(3)})
    assert code_of(data, limits=DataLimits(max_images=2)) == "too-many-images"


def test_zip_bomb_is_refused_before_decompressing():
    noise = np.random.default_rng(0).bytes(2**15)  # incompressible: keeps the overall ratio low
    zeros = bytes(2 * 2**20)  # deflates ~1000x
    assert code_of(make_zip({"ok.png": PNG, "zeros.png": zeros, "n.bin": noise})) == "compression-ratio"
    many = {f"{i}.png": bytes(2**20) for i in range(3)}  # each at the 1 MiB floor, together over it
    assert code_of(make_zip(many)) == "compression-ratio"
    assert len(open_images(make_zip({"ok.png": PNG, "zeros.bmp": zeros}, zipfile.ZIP_STORED))) == 1


def test_gzip_bomb_in_tar_headers_is_stopped_early():
    # tarfile reads a pax header whole before yielding any member: the stream guard must catch it.
    info = tarfile.TarInfo("ok.png")
    info.size = len(PNG)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info.pax_headers = {"comment": "x" * 4 * 2**20}
        tf.addfile(info, io.BytesIO(PNG))
    assert code_of(buf.getvalue()) == "compression-ratio"
    # Uncompressed, the bound on bytes read (limits plus a per-entry header allowance) stops it.
    plain = gzip.decompress(buf.getvalue())
    assert code_of(plain, limits=DataLimits(max_total_bytes=10_000, max_entries=10)) == "archive-too-large"
    assert open_images(plain).names == ["ok.png"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_too_large(kind):
    files = {"a.png": PNG, "b.jpg": JPEG}
    data = make_zip(files) if kind == "zip" else make_tar(files)
    assert code_of(data, limits=DataLimits(max_file_bytes=len(JPEG) - 1)) == "archive-too-large"
    assert code_of(data, limits=DataLimits(max_total_bytes=len(JPEG))) == "archive-too-large"
    assert len(open_images(data, limits=DataLimits(max_total_bytes=len(JPEG) + len(PNG)))) == 2


@pytest.mark.parametrize("name", ["inner.zip", "sub/x.tar.gz", "x.tgz", "x.rar", "X.7Z"])
def test_nested_archive_is_refused(name):
    assert code_of(make_zip({"ok.png": PNG, name: make_zip({"a.png": PNG})})) == "nested-archive"
    assert code_of(make_tar({"ok.png": PNG, name: b"data"})) == "nested-archive"


def test_corrupt_archives():
    good_zip, good_tgz = make_zip({"a.png": JPEG}), make_tar({"a.png": JPEG, "b.png": PNG})
    assert code_of(good_zip[: len(good_zip) // 2]) == "corrupt-archive"
    assert code_of(good_tgz[: len(good_tgz) // 2]) == "corrupt-archive"
    assert code_of(make_tar({"a.png": JPEG}, mode="w")[:1024]) == "corrupt-archive"
    stored = bytearray(make_zip({"a.png": JPEG}, zipfile.ZIP_STORED))
    stored[100] ^= 0xFF  # inside the member data: CRC mismatch
    assert code_of(bytes(stored)) == "corrupt-archive"


def test_unsupported_and_missing_inputs(tmp_path):
    (tmp_path / "single.png").write_bytes(PNG)
    assert code_of(tmp_path / "single.png") == "unsupported-format"
    assert code_of(b"just some text, not an archive") == "unsupported-format"
    assert code_of(gzip.compress(PNG)) == "unsupported-format"
    assert code_of(tmp_path / "nope") == "not-found"


def test_no_usable_images_summarises_rejections(tmp_path):
    write_tree(tmp_path, {"a.txt": b"x", "b.png": b"not a png"})
    with pytest.raises(DataError) as info:
        open_images(tmp_path)
    assert info.value.code == "no-usable-images"
    assert "a.txt: not an image file" in str(info.value) and "b.png: not a decodable image" in str(info.value)
    assert code_of(make_zip({})) == "no-usable-images"


def test_from_images_keeps_order_and_converts():
    images = ImageSet.from_images([Image.new("L", (3, 3), 7), Image.new("RGBA", (2, 2))], names=["z", "a"])
    assert images.names == ["z", "a"] and len(images) == 2
    assert images[0].mode == "RGB" and images[0].getpixel((0, 0)) == (7, 7, 7)
    assert ImageSet.from_images([Image.new("RGB", (1, 1))]).names == ["000000"]
    with pytest.raises(IndexError):
        images[2]
    with pytest.raises(ValueError):
        ImageSet.from_images([Image.new("RGB", (1, 1))], names=["a", "b"])


# --------------------------------------------------------------------------- labelled sets


def test_labelled_folder(tmp_path):
    write_tree(tmp_path, {"dog/a.png": PNG, "cat/deep/er/b.png": PNG, "cat/c.jpg": JPEG, "stray.png": PNG})
    labelled = open_labelled_images(tmp_path)
    assert labelled.class_names == ["cat", "dog"]
    assert labelled.images.names == ["cat/c.jpg", "cat/deep/er/b.png", "dog/a.png"]
    assert labelled.labels == [0, 0, 1]
    assert reasons(labelled.images) == {"stray.png": "not inside a class folder"}


def test_labelled_zip_descends_into_single_top_folder():
    data = make_zip({"my data/cat/a.png": PNG, "my data/dog/b.png": PNG, "__MACOSX/my data/._x": b"x"})
    labelled = open_labelled_images(data)
    assert labelled.class_names == ["cat", "dog"] and labelled.labels == [0, 1]
    assert labelled.images.names == ["my data/cat/a.png", "my data/dog/b.png"]


def test_labelled_does_not_descend_into_a_class_folder():
    data = make_zip({"cat/a.png": PNG, "cat/sub/b.png": PNG})
    assert open_labelled_images(data).class_names == ["cat"]
    only_sub_folders = make_zip({"Cat/x/a.png": PNG, "Cat/y/b.png": PNG})
    assert open_labelled_images(only_sub_folders).class_names == ["x", "y"]
    assert open_labelled_images(only_sub_folders, class_names=["cat"]).labels == [0, 0]


def test_labelled_matches_given_class_names(tmp_path):
    write_tree(tmp_path, {"Golden_Retriever/a.png": PNG, "tabby-cat/b.png": PNG, "tabby-cat/c.png": PNG})
    labelled = open_labelled_images(tmp_path, class_names=["Tabby Cat", "golden retriever", "fox"])
    assert labelled.class_names == ["Tabby Cat", "golden retriever", "fox"]
    assert labelled.labels == [1, 0, 0]
    with pytest.raises(DataError) as info:
        open_labelled_images(tmp_path, class_names=["tabby cat", "wolf"])
    assert info.value.code == "unknown-class" and "Golden_Retriever" in info.value.message


def test_labelled_without_class_folders():
    with pytest.raises(DataError) as info:
        open_labelled_images(make_zip({"a.png": PNG}))
    assert info.value.code == "no-usable-images"


@pytest.mark.parametrize("raw, expected", [
    ("Golden_Retriever", "golden retriever"),
    ("  tabby--cat ", "tabby cat"),
    ("CAFE\u0301", "caf\u00e9"),  # macOS zips use decomposed Unicode
    ("sea lion", "sea lion"),
])
def test_normalise_class_name(raw, expected):
    assert normalise_class_name(raw) == expected


# --------------------------------------------------------------------------- a dataset in parts


def test_several_archives_are_one_set_and_a_path_in_two_parts_is_a_duplicate(tmp_path):
    first = tmp_path / "part1.zip"
    first.write_bytes(make_zip({"a/1.png": PNG, "a/2.jpg": JPEG}))
    second = tmp_path / "part2.tar.gz"
    second.write_bytes(make_tar({"b/3.png": PNG, "a/1.png": JPEG, "notes.txt": b"hi"}))
    images = open_images([first, second])
    assert images.names == ["a/1.png", "a/2.jpg", "b/3.png"]
    assert reasons(images) == {"a/1.png": "duplicate path in archive", "notes.txt": "not an image file"}
    assert images[0].size == Image.open(io.BytesIO(PNG)).size  # the first part's a/1.png, not the second's


def test_parts_without_one_usable_image_are_refused_together(tmp_path):
    empty = tmp_path / "empty.zip"
    empty.write_bytes(make_zip({"notes.txt": b"hi"}))
    assert code_of([empty, empty]) == code_of(empty)
    good = tmp_path / "good.zip"
    good.write_bytes(make_zip({"x.png": PNG}))
    assert len(open_images([empty, good])) == 1  # a part with no image is fine when another has some


@pytest.mark.parametrize("kinds", [["zip"], ["tar"], ["tar.gz"], ["zip", "tar.gz", "tar"]])
def test_an_archive_index_reads_the_same_images_in_the_same_order(tmp_path, kinds):
    """What the dashboard's thumbnails read: image i of the index is image i of open_images, first
    copy of a repeated path included, with only the archives' directories kept open."""
    parts = []
    for number, kind in enumerate(kinds):
        files = {f"p{number}/{i}.jpg": encode("JPEG", size=(24 + i, 20), seed=10 * number + i) for i in range(3)}
        files.update({"shared/x.png": encode("PNG", size=(8 + number, 8), seed=number), "notes.txt": b"hi",
                      "bad.png": b"\x89PNG not really"})
        path = tmp_path / f"part{number}.bin"
        path.write_bytes(make_zip(files) if kind == "zip" else make_tar(files, "w" if kind == "tar" else "w:gz"))
        parts.append(path)
    images = open_images(parts)
    index = coft.data.ArchiveIndex(parts)
    assert index.names == images.names and len(index) == len(images)
    for i in range(len(images)):
        assert np.array_equal(np.asarray(index.decode(i)), np.asarray(images[i])), images.names[i]
    assert index.decode(images.names.index("shared/x.png")).size == (8, 8)  # the first part's copy
    index.close()

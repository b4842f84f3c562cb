"""The storage contract, on both backends: local disk, and an S3 bucket on a real S3 server (moto).

Every test runs against each; what differs between them (paths, a cache of downloads) stays behind
the interface of app.core.storage.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from app.core.storage import LocalCache, LocalStorage, S3Storage, get_storage
from app.core.settings import Settings


@pytest.fixture(params=["local", "s3"])
def make_storage(request, tmp_path):
    """A factory of storages that share one store: each call is another host (its own local cache)."""
    if request.param == "local":
        return lambda host="a": LocalStorage(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    return lambda host="a": S3Storage(bucket, "prefix", LocalCache(tmp_path / f"cache-{host}", 2**30),
                                      client=server.client())


def directory(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_objects_round_trip_with_their_size_and_hash(make_storage):
    storage = make_storage()
    data = os.urandom(300_000)
    assert storage.write("datasets/ds_a/archive", iter([data[:1000], data[1000:]])) == (
        len(data), hashlib.sha256(data).hexdigest())
    assert storage.exists("datasets/ds_a/archive") and storage.exists("datasets/ds_a")
    with storage.open("datasets/ds_a/archive") as stream:
        assert stream.read() == data
    with storage.local_file("datasets/ds_a/archive") as path:
        assert path.read_bytes() == data
    with make_storage("b").local_file("datasets/ds_a/archive") as path:  # another host
        assert path.read_bytes() == data
    assert not storage.exists("datasets/ds_other")


def test_an_artifact_directory_is_written_once(make_storage, tmp_path):
    storage = make_storage()
    source = directory(tmp_path / "artifact", {"classifier.json": b"{}", "weights/model.safetensors": b"w" * 100})
    assert storage.put_dir("classifiers/clf_a/v1", source) == 102
    with pytest.raises(FileExistsError):
        storage.put_dir("classifiers/clf_a/v1", source)  # a new version goes under a new key
    with make_storage("b").local_dir("classifiers/clf_a/v1") as stored:
        assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()) == [
            "classifier.json", "weights/model.safetensors"]
        assert (stored / "weights" / "model.safetensors").read_bytes() == b"w" * 100
    with pytest.raises(FileNotFoundError):
        with storage.local_dir("classifiers/clf_missing"):
            pass


def test_a_reader_of_a_published_artifact_always_finds_it_whole(make_storage, tmp_path):
    """put_dir returns once every file is stored, and a key is named (a row committed) only then:
    a reader that reads what was published, while more is being written, never finds a part."""
    storage = make_storage()
    weights = os.urandom(2**20)
    source = directory(tmp_path / "artifact", {"model.safetensors": weights, "classifier.json": b'{"ok": 1}'})
    published, torn, writing = [], [], True

    def read() -> None:
        reader = make_storage("reader")
        while writing or published:
            if not published:
                continue
            key = published.pop()
            with reader.local_dir(key) as stored:
                if ((stored / "model.safetensors").read_bytes() != weights
                        or (stored / "classifier.json").read_bytes() != b'{"ok": 1}'):
                    torn.append(key)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for i in range(8):
            key = f"classifiers/clf_{i}/v1"
            storage.put_dir(key, source)
            published.append(key)
    finally:
        writing = False
        thread.join(60)
    assert torn == [] and not thread.is_alive()


def test_a_work_dir_is_resumed_on_another_host_but_its_images_stay_local(make_storage, tmp_path):
    first = make_storage("a")
    with first.work_dir("jobs/job_a/checkpoints") as work:
        directory(work.path, {"zero-shot.pt": b"zs", "run.json": b"{}", "images/images-x.u8": b"pixels"})
        work.sync()
        (work.path / "phase1-model1.pt").write_bytes(b"p1")  # stored when the block ends
    with make_storage("b").work_dir("jobs/job_a/checkpoints") as resumed:
        names = sorted(p.relative_to(resumed.path).as_posix() for p in resumed.path.rglob("*") if p.is_file())
        if isinstance(first, S3Storage):  # another host has what the store has, not the decoded images
            assert names == ["phase1-model1.pt", "run.json", "zero-shot.pt"]
        assert (resumed.path / "zero-shot.pt").read_bytes() == b"zs"
    first.delete("jobs/job_a/checkpoints")
    with make_storage("c").work_dir("jobs/job_a/checkpoints") as empty:
        assert not list(empty.path.rglob("*.pt"))


def test_delete_removes_objects_and_prefixes_and_ignores_missing_keys(make_storage, tmp_path):
    storage = make_storage()
    storage.write("jobs/job_a/predictions.json", [b"[]"])
    storage.put_dir("classifiers/clf_a/v1", directory(tmp_path / "a", {"x": b"1"}))
    storage.delete("jobs/job_a/predictions.json")
    storage.delete("classifiers/clf_a")  # every version
    storage.delete("classifiers/clf_never")
    assert not storage.exists("jobs/job_a/predictions.json") and not storage.exists("classifiers/clf_a/v1")


def test_the_local_cache_keeps_the_most_recently_used_within_its_bound(tmp_path):
    cache = LocalCache(tmp_path / "cache", max_bytes=2500)
    for i in range(4):
        cache.fetch(f"datasets/ds_{i}/archive", lambda path: path.write_bytes(b"x" * 1000))
        os.utime(cache.path(f"datasets/ds_{i}/archive"), (i, i))  # ages, oldest first
    cache.fetch("datasets/ds_4/archive", lambda path: path.write_bytes(b"x" * 1000))
    kept = sorted(p.parent.parent.name for p in (tmp_path / "cache" / "objects").glob("*/*"))
    assert len(kept) == 2 and cache.path("datasets/ds_4/archive").exists()
    assert cache.path("datasets/ds_3/archive").exists()  # the two newest stay, the rest went


def test_an_s3_directory_is_downloaded_once_and_stays_whole_while_it_is_read(s3_server, tmp_path):
    """A dataset's parts and a classifier's files go through the bounded cache (they are write-once
    keys), and the block reads every file whole even when the cache cannot hold them all."""
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    storage = S3Storage(bucket, "prefix", LocalCache(tmp_path / "cache", max_bytes=1500), client=client)
    parts = {f"p{i}.zip": bytes([i]) * 1000 for i in range(3)}
    storage.put_dir("datasets/ds_a/parts", directory(tmp_path / "parts", parts))
    with storage.local_dir("datasets/ds_a/parts") as folder:
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == parts
    cached = [p for p in (tmp_path / "cache" / "objects").glob("*/*")]
    assert sum(p.stat().st_size for p in cached) <= 1500  # the cache kept its bound
    roomy = S3Storage(bucket, "prefix", LocalCache(tmp_path / "roomy", max_bytes=2**20), client=client)
    with roomy.local_dir("datasets/ds_a/parts") as folder:
        assert (folder / "p1.zip").read_bytes() == parts["p1.zip"]
    # Changed behind the store's back (never done to a real key): the second read is the cache's copy.
    client.put_object(Bucket=bucket, Key="prefix/datasets/ds_a/parts/p1.zip", Body=b"changed")
    with roomy.local_dir("datasets/ds_a/parts") as folder:
        assert (folder / "p1.zip").read_bytes() == parts["p1.zip"]


def test_the_settings_choose_the_backend(tmp_path, s3_server):
    assert isinstance(get_storage(Settings(_env_file=None, data_dir=tmp_path)), LocalStorage)
    storage = get_storage(Settings(_env_file=None, data_dir=tmp_path, storage_url=f"s3://{s3_server.new_bucket()}/p",
                                   s3_endpoint_url=s3_server.endpoint_url))
    assert isinstance(storage, S3Storage) and storage.prefix == "p"
    storage.write("k", [b"v"])
    with pytest.raises(ValueError, match="s3://"):
        get_storage(Settings(_env_file=None, data_dir=tmp_path, storage_url="gs://bucket"))

"""The storage interface (core.storage) on both backends: a local folder, and S3 over HTTP against moto's S3
server (the same client code that talks to MinIO or AWS). Atomic writes, sha256 on every object, a local cache
that detects a corrupted copy and fetches it again, and deletion by prefix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.storage import LocalCache, LocalStorage, S3Storage, StorageError, check_key, open_storage
from tests.s3_server import make_bucket, moto_server, s3_env

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> S3Storage:
    # The standard variables boto3 reads: the code under test sets nothing provider-specific.
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    bucket = make_bucket(s3_endpoint, request.node.name)
    storage = open_storage(f"s3://{bucket}/prefix", "/nonexistent")
    assert isinstance(storage, S3Storage)
    return storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStorage | S3Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return request.getfixturevalue("s3")


def test_every_kind_of_artifact_round_trips_with_its_sha256(storage, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"weights" * 100_000)
    keys = {"datasets/ds_1/annotations.json": b'{"images": []}', "checkpoints/ck_1.pt": b"\x80\x02x",
            "models/mdl_1/model.onnx": b"onnx bytes"}  # fmt: skip
    shas = {k: storage.put_bytes(k, v) for k, v in keys.items()}
    run_sha = storage.put_file("runs/job_1/ckpt.pt", src)
    assert (
        storage.sha256("runs/job_1/ckpt.pt") == run_sha
        and storage.sha256("models/mdl_1/model.onnx") == shas["models/mdl_1/model.onnx"]
    )
    assert storage.list() == sorted([*keys, "runs/job_1/ckpt.pt"])
    assert storage.list("runs") == ["runs/job_1/ckpt.pt"] and storage.list("runs/job_2") == []
    assert storage.get_file("runs/job_1/ckpt.pt", tmp_path / "out" / "c.pt") == run_sha
    assert (tmp_path / "out" / "c.pt").read_bytes() == src.read_bytes()
    assert storage.read_bytes("checkpoints/ck_1.pt") == b"\x80\x02x"
    assert storage.usage() == sum(len(v) for v in keys.values()) + src.stat().st_size
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("models/mdl_2/model.onnx")
    assert not storage.exists("models/mdl_2/model.onnx") and storage.exists("models/mdl_1/model.onnx")
    assert storage.delete_prefix("datasets/ds_1") == 1 and not storage.exists("datasets/ds_1/annotations.json")
    storage.delete("runs/job_1/ckpt.pt")
    assert storage.list() == ["checkpoints/ck_1.pt", "models/mdl_1/model.onnx"]


class _Broken:
    """A file whose read fails halfway, as a disk or a network would."""

    def __init__(self, data: bytes):
        self.data, self.sent = data, False

    def read(self, n: int = -1) -> bytes:
        if self.sent:
            raise OSError("connection reset")
        self.sent = True
        return self.data[: len(self.data) // 2]


def test_a_partial_write_is_never_visible(storage, tmp_path: Path) -> None:
    storage.put_bytes("models/mdl_1/model.onnx", b"old model")
    if isinstance(storage, LocalStorage):
        with pytest.raises(OSError):
            storage._put("models/mdl_1/model.onnx", _Broken(b"x" * 100))  # type: ignore[arg-type]
    else:
        with pytest.raises(Exception):  # noqa: B017 - boto3 wraps the reader's error in its own
            storage.client.upload_fileobj(_Broken(b"x" * (16 << 20)), storage.bucket,
                                          storage._name("models/mdl_1/model.onnx"))  # fmt: skip
    assert storage.read_bytes("models/mdl_1/model.onnx") == b"old model"
    assert storage.list("models") == ["models/mdl_1/model.onnx"]


def test_cache_fetches_once_and_again_when_its_copy_is_corrupted(storage, tmp_path: Path) -> None:
    sha = storage.put_bytes("datasets/ds_1/images/a.jpg", b"\xff\xd8 a photo")
    cache = LocalCache(tmp_path / "cache")
    local = cache.fetch(storage, "datasets/ds_1/images/a.jpg", sha)
    assert local.read_bytes() == b"\xff\xd8 a photo"
    storage.put_bytes("datasets/ds_1/images/a.jpg", b"\xff\xd8 a photo")  # same bytes: the copy stays valid
    local.write_bytes(b"\xff\xd8 a phot0")  # bit rot in the cache
    again = cache.fetch(storage, "datasets/ds_1/images/a.jpg", sha)
    assert again == local and again.read_bytes() == b"\xff\xd8 a photo"
    storage.put_bytes("datasets/ds_1/images/a.jpg", b"changed")  # the object no longer matches its record
    local.unlink()
    with pytest.raises(StorageError, match="sha256"):
        cache.fetch(storage, "datasets/ds_1/images/a.jpg", sha)
    assert not local.exists()


def test_cache_evicts_the_least_recently_used_beyond_its_size(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    for i in range(4):
        storage.put_bytes(f"runs/job_{i}/ckpt.pt", bytes(1000))
    cache = LocalCache(tmp_path / "cache", max_bytes=2500)
    paths = [cache.fetch(storage, f"runs/job_{i}/ckpt.pt") for i in range(4)]
    assert [p.exists() for p in paths] == [False, False, True, True]


def test_keys_cannot_leave_the_root_and_urls_are_checked(tmp_path: Path) -> None:
    for bad in ("../x", "/etc/passwd", "a//b", "a/../b", "", "a\\b"):
        with pytest.raises(StorageError):
            check_key(bad)
    assert check_key("runs/job_1/ckpt.pt") == "runs/job_1/ckpt.pt"
    assert isinstance(open_storage("", tmp_path), LocalStorage)
    assert open_storage(f"file://{tmp_path}/x", "/unused").root == tmp_path / "x"
    for bad in ("s3://", "ftp://host/x"):
        with pytest.raises(StorageError):
            open_storage(bad, tmp_path)


def test_a_prefix_is_a_folder_not_the_start_of_a_name(storage) -> None:
    """Deleting run job_1 must not take job_10's files (S3 prefixes are strings; ours are folders)."""
    for key in ("runs/job_1/a.pt", "runs/job_10/a.pt", "runs/job_1.pt"):
        storage.put_bytes(key, b"x")
    assert storage.list("runs/job_1") == ["runs/job_1/a.pt"] and storage.usage("runs/job_1") == 1
    assert storage.delete_prefix("runs/job_1") == 1
    assert storage.list("runs") == ["runs/job_1.pt", "runs/job_10/a.pt"]

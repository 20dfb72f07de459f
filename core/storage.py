"""Where the service keeps its files: datasets, uploaded checkpoints, runs and published models (torch-free).

One interface, two backends, chosen by ``LDD_STORAGE_URL``:

- a local folder (``""`` or ``file:///path``; the embedded default): keys are paths under the folder;
- S3-compatible object storage (``s3://bucket/prefix``: MinIO, AWS, or any server speaking the S3 API),
  through boto3, which reads the endpoint and credentials from the standard variables (``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so nothing here is specific to one
  provider.

Keys are relative, ``/``-separated names (``runs/job_x/ckpt.pt``); the store records keys, never absolute
paths. Every write is atomic: a reader sees the whole object or nothing (the local backend writes a temporary
file and renames it; S3 makes an object visible only when its upload completes). Every object carries the
sha256 of its bytes, returned by ``put_*`` and checked by :class:`LocalCache` when it fetches a copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Protocol

CHUNK = 1 << 20


class StorageError(RuntimeError):
    pass


class Storage(Protocol):
    url: str

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str: ...
    def put_bytes(self, key: str, data: bytes) -> str: ...
    def get_file(self, key: str, dest: str | os.PathLike[str]) -> str: ...
    def read_bytes(self, key: str) -> bytes: ...
    def sha256(self, key: str) -> str | None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def usage(self, prefix: str = "") -> int: ...


def check_key(key: str) -> str:
    """A key is a relative name without ``..`` or empty parts: it can never leave the storage's root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise StorageError(f"invalid storage key {key!r}")
    return key


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_copy(src: IO[bytes], dest: Path) -> str:
    """``src`` into ``dest`` through a temporary file in its folder and a rename; the bytes' sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            sha = _copy_hashing(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha


class LocalStorage:
    """Objects as files under ``root``; each file's sha256 in a ``<name>.sha256`` file beside it."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _put(self, key: str, src: IO[bytes]) -> str:
        dest = self.path(key)
        sha = _atomic_copy(src, dest)
        dest.with_name(dest.name + ".sha256").write_text(sha)
        return sha

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        with open(path, "rb") as f:
            return self._put(key, f)

    def put_bytes(self, key: str, data: bytes) -> str:
        import io

        return self._put(key, io.BytesIO(data))

    def get_file(self, key: str, dest: str | os.PathLike[str]) -> str:
        src = self.path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.url}: no object {key!r}")
        with open(src, "rb") as f:
            return _atomic_copy(f, Path(dest))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: no object {key!r}") from None

    def sha256(self, key: str) -> str | None:
        side = self.path(key).with_name(self.path(key).name + ".sha256")
        return side.read_text().strip() if side.is_file() else None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        files = [base] if base.is_file() else base.rglob("*")
        keys = (p.relative_to(self.root).as_posix() for p in files if p.is_file())
        return sorted(k for k in keys if not k.endswith((".sha256", ".part")) and not Path(k).name.startswith("."))

    def delete(self, key: str) -> None:
        p = self.path(key)
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".sha256").unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(check_key(prefix.rstrip("/")))
        for key in keys:
            self.delete(key)
        shutil.rmtree(self.root / prefix.rstrip("/"), ignore_errors=True)
        return len(keys)

    def usage(self, prefix: str = "") -> int:
        return sum(self.path(k).stat().st_size for k in self.list(prefix))


class S3Storage:
    """Objects in ``bucket`` under ``prefix``, through boto3; each object's sha256 in its ``sha256`` metadata."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None):
        import boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # boto3 reads AWS_ENDPOINT_URL, the credentials and the region from the environment.
        self.client = client or boto3.client("s3")

    def _name(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def put_file(self, key: str, path: str | os.PathLike[str]) -> str:
        sha = file_sha256(path)
        # upload_file sends large files in parts; S3 shows the object only once every part is in.
        self.client.upload_file(str(path), self.bucket, self._name(key), ExtraArgs={"Metadata": {"sha256": sha}})
        return sha

    def put_bytes(self, key: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data, Metadata={"sha256": sha})
        return sha

    def get_file(self, key: str, dest: str | os.PathLike[str]) -> str:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{self.url}: no object {key!r}") from None
        with body:
            return _atomic_copy(body, Path(dest))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{self.url}: no object {key!r}") from None

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def sha256(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def _objects(self, prefix: str) -> list[dict[str, Any]]:
        """The objects at ``prefix`` (one object) or under it as a folder: ``runs/job_1`` is not ``runs/job_10``."""
        full = self._name(prefix.rstrip("/")) if prefix else self.prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        objects = [o for page in pages for o in page.get("Contents", [])]
        return [o for o in objects if not full or o["Key"] == full or o["Key"].startswith(full + "/")]

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._key(o["Key"]) for o in self._objects(prefix))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_prefix(self, prefix: str) -> int:
        names = [o["Key"] for o in self._objects(check_key(prefix.rstrip("/")))]
        for i in range(0, len(names), 1000):  # the API's limit per call
            batch = [{"Key": n} for n in names[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(names)

    def usage(self, prefix: str = "") -> int:
        return sum(int(o["Size"]) for o in self._objects(prefix))


def open_storage(url: str, local_root: str | os.PathLike[str]) -> LocalStorage | S3Storage:
    """The storage of ``LDD_STORAGE_URL``: ``""`` -> the local folder ``local_root``; ``file:///path``;
    ``s3://bucket[/prefix]``."""
    if not url:
        return LocalStorage(local_root)
    if url.startswith("file://"):
        return LocalStorage(url.removeprefix("file://"))
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"LDD_STORAGE_URL {url!r} names no bucket (s3://bucket/prefix)")
        return S3Storage(bucket, prefix)
    raise StorageError(f"LDD_STORAGE_URL {url!r}: use s3://bucket/prefix, file:///path, or leave it empty")


def copy_verified(storage: Storage, key: str, dest: Path, sha256: str | None) -> bool:
    """Make ``dest`` a copy of the object ``key`` whose bytes hash to ``sha256``: kept when it already does, else
    fetched and checked (``StorageError``, ``dest`` removed, when the object's bytes are not the recorded ones).
    True when it was fetched."""
    if dest.is_file() and sha256 is not None and file_sha256(dest) == sha256:
        return False
    got = storage.get_file(key, dest)
    if sha256 is not None and got != sha256:
        dest.unlink(missing_ok=True)
        raise StorageError(f"{storage.url}/{key}: sha256 {got} but {sha256} was recorded: the object changed")
    return True


class LocalCache:
    """A worker's or a server's local copies of stored objects, verified by sha256 and evicted by size.

    :meth:`fetch` returns a local path whose bytes hash to the expected sha256: a missing or corrupted copy
    (checked every time: a disk error or a half-written file must not reach training or serving) is fetched
    again. When the cache holds more than ``max_bytes``, the least recently used copies go first.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = 0):
        self.root, self.max_bytes = Path(root), max_bytes

    def fetch(self, storage: Storage, key: str, sha256: str | None = None, *, evict: bool = True) -> Path:
        expected = sha256 or storage.sha256(key)
        local = self.root / check_key(key)
        if (expected is None and local.is_file()) or not copy_verified(storage, key, local, expected):
            os.utime(local)  # recently used
            return local
        if evict:
            self.evict(keep=[local])
        return local

    def evict(self, keep: list[Path] | None = None) -> int:
        """Removes the least recently used copies until the cache fits ``max_bytes`` (0: no limit); returns
        the bytes freed. Files in ``keep``, or under a folder in it (what a caller is about to use), stay."""
        if self.max_bytes <= 0 or not self.root.exists():
            return 0
        kept = [Path(k) for k in keep or []]
        files = sorted((p for p in self.root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        freed = 0
        for p in files:
            if total - freed <= self.max_bytes:
                break
            if any(p == k or k in p.parents for k in kept):
                continue
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            freed += size
        return freed

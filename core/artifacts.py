"""The service's files by storage key: datasets, uploaded checkpoints, runs and published models (torch-free).

Keys are the layout of ``core.settings`` (``datasets/<id>``, ``checkpoints/<id>.pt``, ``runs/<job>/...``,
``models/<id>``); the store records keys, never paths. Where the bytes live is ``LDD_STORAGE_URL``'s choice:

- **the local folder** (empty; one machine, the embedded default): a key *is* the path under ``data_dir``, so
  nothing is copied and :meth:`Artifacts.publish_tree` / :meth:`Artifacts.push_run` have nothing to do;
- **object storage** (``s3://bucket/prefix``): every machine works on local copies. What it makes is assembled
  under ``data_dir/cache/<key>`` (:meth:`Artifacts.staging`) and then uploaded; what it reads is fetched into
  the same place and verified by sha256 (:class:`core.storage.LocalCache`), least recently used copies evicted
  beyond ``LDD_CACHE_BYTES``. A worker trains in ``data_dir/runs/<job>`` on its own disk and uploads the run's
  files at every checkpoint (:meth:`Artifacts.push_run`); another machine resumes from them
  (:meth:`Artifacts.pull_run`).

A folder (a data set, a model) is stored as its files plus ``<key>/.manifest.json`` (``{relative name:
sha256}``), written last: a reader that finds the manifest finds every file it names, so nobody ever sees part
of a folder, and each copy is checked against the hash the manifest gives.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from core.settings import Settings
from core.storage import LocalCache, LocalStorage, Storage, check_key, copy_verified, file_sha256, open_storage

MANIFEST = ".manifest.json"
FINISHED = "metrics.json"  # a run with it has finished training (worker.jobs): uploaded after the rest
# Never copied between machines: the relay of the running attempt (its history is in the store) and the
# intermediate export (redone by the attempt that publishes).
RUN_LOCAL_ONLY = ("progress.json", "progress.jsonl", "export/", "export.json", "error.json")


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def checkpoint_key(checkpoint_id: str) -> str:
    return f"checkpoints/{checkpoint_id}.pt"


def model_key(model_id: str) -> str:
    return f"models/{model_id}"


def run_key(job_id: str, name: str = "") -> str:
    return f"runs/{job_id}/{name}" if name else f"runs/{job_id}"


class Artifacts:
    """One machine's view of the stored files (module docstring)."""

    def __init__(self, settings: Settings, storage: Storage | None = None):
        self.settings = settings
        self.storage: Storage = storage or open_storage(settings.storage_url, settings.data_dir)
        local = isinstance(self.storage, LocalStorage) and self.storage.root == settings.data_dir.absolute()
        self.remote = not local
        self.cache = LocalCache(settings.cache_dir, settings.cache_bytes)
        self._pushed: dict[str, tuple[float, int]] = {}  # run file -> (mtime, size) last uploaded
        # Folders fetched and verified whole by this process: a data set's pictures are drawn one request at a
        # time, and hashing every image for each would make the page crawl. Published folders never change.
        # (An eviction is noticed: every file of the manifest must still be there.)
        self._trees: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return self.storage.url

    # -- making ------------------------------------------------------------------------------------

    def staging(self, key: str) -> Path:
        """Where this machine assembles (or keeps its copy of) the file or folder ``key``."""
        check_key(key)
        return (self.settings.cache_dir if self.remote else self.settings.data_dir) / key

    def publish_file(self, key: str) -> str:
        """Store the file assembled at :meth:`staging` (atomic: readers see it whole or not at all); its sha256."""
        path = self.staging(key)
        return self.storage.put_file(key, path) if self.remote else file_sha256(path)

    def publish_tree(self, key: str) -> dict[str, str]:
        """Store the folder assembled at :meth:`staging`: its files, then its manifest; ``{name: sha256}``."""
        root = self.staging(key)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
        if not self.remote:
            return {p.relative_to(root).as_posix(): file_sha256(p) for p in files}
        shas = {(rel := p.relative_to(root).as_posix()): self.storage.put_file(f"{key}/{rel}", p) for p in files}
        self.storage.put_bytes(f"{key}/{MANIFEST}", json.dumps(shas, sort_keys=True).encode())  # last: visible now
        return shas

    # -- reading -----------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """Whether the file or the whole folder ``key`` is stored (a folder: its manifest)."""
        if not self.remote:
            return (self.settings.data_dir / check_key(key)).exists()
        return self.storage.exists(key) or self.storage.exists(f"{key}/{MANIFEST}")

    def file(self, key: str) -> Path:
        """A local path holding the stored file ``key``, fetched and verified with object storage (a run's file
        that this machine trained is read where it is, when it is the stored one)."""
        local = self.settings.data_dir / check_key(key)
        if not self.remote:
            if not local.is_file():
                raise FileNotFoundError(f"{self.url}: no object {key!r}")
            return local
        sha = self.storage.sha256(key)
        if sha is None and not self.storage.exists(key):
            raise FileNotFoundError(f"{self.url}: no object {key!r}")
        if key.startswith("runs/") and local.is_file() and sha is not None and file_sha256(local) == sha:
            return local
        return self.cache.fetch(self.storage, key, sha, evict=False)

    def tree(self, key: str) -> Path:
        """A local folder holding the stored folder ``key`` whole, every file checked against its manifest."""
        if not self.remote:
            path = self.settings.data_dir / check_key(key)
            if not path.is_dir():
                raise FileNotFoundError(f"{self.url}: no folder {key!r}")
            return path
        local = self.cache.root / key
        if key in self._trees and all((local / name).is_file() for name in self._trees[key]):
            return local
        try:
            manifest: dict[str, str] = json.loads(self.storage.read_bytes(f"{key}/{MANIFEST}"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: no folder {key!r} (no {MANIFEST})") from None
        for name, sha in manifest.items():
            self.cache.fetch(self.storage, f"{key}/{name}", sha, evict=False)
        self._trees[key] = list(manifest)
        return local

    def ping(self) -> str:
        """``ok``, or why the storage cannot be reached (``/readyz``); the data folder is always there."""
        if not self.remote:
            return "ok"
        try:
            self.storage.exists(MANIFEST)  # one request; a missing object is an answer too
        except Exception as e:
            return f"unreachable: {type(e).__name__}: {e}"
        return "ok"

    def evict(self, keep: Iterable[Path] = ()) -> int:
        """Trim the local copies to ``LDD_CACHE_BYTES``, never touching the files or folders in ``keep``."""
        return self.cache.evict(keep=list(keep)) if self.remote else 0

    # -- removing ----------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Remove the file or folder ``key`` from storage and this machine's copy of it."""
        check_key(key)
        self._trees.pop(key, None)
        if self.remote:
            self.storage.delete_prefix(key)  # the object ``key``, or a folder's files and manifest
        for root in {self.staging(key), self.settings.data_dir / key}:
            if root.is_dir():
                shutil.rmtree(root, ignore_errors=True)
            else:
                root.unlink(missing_ok=True)

    def usage(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (``/metrics``)."""
        if not self.remote:
            return _folder_bytes(self.settings.data_dir / prefix)
        return self.storage.usage(prefix)

    # -- runs (a worker's local training folder) -----------------------------------------------------

    def push_run(self, job_id: str) -> list[str]:
        """Upload the files of ``runs/<job>`` changed since the last push (checkpoints, logs, the final weights);
        the keys uploaded. Nothing with the local folder (the run is already in it)."""
        if not self.remote:
            return []
        run_dir = self.settings.run_dir(job_id)
        done: list[str] = []
        files = sorted(run_dir.rglob("*"), key=lambda p: (p.name == FINISHED, p)) if run_dir.is_dir() else []
        for path in (p for p in files if p.is_file()):
            rel = path.relative_to(run_dir).as_posix()
            if _local_only(rel) or path.name.startswith("."):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # replaced between listing and reading (checkpoints rotate)
                continue
            seen = (stat.st_mtime, stat.st_size)
            if self._pushed.get(rel_key := run_key(job_id, rel)) == seen:
                continue
            try:
                self.storage.put_file(rel_key, path)
            except FileNotFoundError:
                continue
            self._pushed[rel_key] = seen
            done.append(rel_key)
        return done

    def pull_run(self, job_id: str) -> list[str]:
        """Bring ``runs/<job>``'s stored files to this machine where its copy is missing or differs (another
        machine trained further, or this one never ran the job): the keys fetched. The stored checkpoint is
        the truth: a local one that was never uploaded is older than the lease that moved the job."""
        if not self.remote:
            return []
        run_dir = self.settings.run_dir(job_id)
        fetched: list[str] = []
        prefix = run_key(job_id) + "/"
        for key in self.storage.list(run_key(job_id)):
            rel = key.removeprefix(prefix)
            if _local_only(rel):
                continue
            local = run_dir / rel
            if not copy_verified(self.storage, key, local, self.storage.sha256(key)):
                continue
            stat = local.stat()
            self._pushed[key] = (stat.st_mtime, stat.st_size)
            fetched.append(key)
        return fetched


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is missing); files vanishing meanwhile count 0."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def _local_only(rel: str) -> bool:
    return any(rel == name or (name.endswith("/") and rel.startswith(name)) for name in RUN_LOCAL_ONLY)


_instances: dict[tuple[str, str, int], Artifacts] = {}


def artifacts_for(settings: Settings) -> Artifacts:
    """The :class:`Artifacts` of ``settings``, one per storage, data folder and cache size in a process (a boto3
    client is costly to make and safe to share between threads)."""
    ident = (settings.storage_url, str(settings.data_dir), settings.cache_bytes)
    if ident not in _instances:
        _instances[ident] = Artifacts(settings)
    return _instances[ident]


__all__ = ["Artifacts", "artifacts_for", "checkpoint_key", "dataset_key", "model_key", "run_key"]

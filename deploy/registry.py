"""Published models: a folder per model holding ``model.onnx`` and ``model.json``. Torch-free.

``model.json`` holds what ``deploy.runtime.Predictor`` needs to run the graph and to trust it (written by
``deploy.export``, given its id by ``Registry.publish``)::

    {"format": "ld-service-model/1", "id": "mdl_..." | null, "classes": [...], "input_size": [long, short],
     "size_divisor": 32, "mean": [...], "std": [...], "color": "RGB", "sha256": "<of model.onnx>",
     "published_at": "2026-11-24T15:00:00.000000Z"}

Everything else about a model (architecture, metrics, source job, export and verification details) is its
description: ``deploy.export.export_model`` returns it, and the service keeps it in the job store's model
row (``worker.publish``), not in this folder.

Publishing is atomic: the folder is assembled under a hidden name in the registry root and renamed into
place, so a reader sees either no model or a complete one. A model whose ``model.onnx`` no longer hashes to
the recorded sha256 is refused (``ModelIntegrityError``) by ``verify`` and by ``deploy.runtime.Predictor``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from distill.files import atomic_write, atomic_write_json, sha256_file

FORMAT = "ld-service-model/1"
ONNX_FILE, META_FILE = "model.onnx", "model.json"
# The keys of model.json; a published model.json keeps only these, whatever its source folder held.
RUNTIME_KEYS = (
    "format",
    "id",
    "classes",
    "input_size",
    "size_divisor",
    "mean",
    "std",
    "color",
    "sha256",
    "published_at",
    "precision",  # bf16: run by OpenVINO in that precision (deploy.precision); absent: the graph's own
    "cpu_features",  # the CPU flags that precision needs; a server without them refuses the model
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelIntegrityError(ValueError):
    """``model.onnx`` is missing, or its sha256 is not the one recorded in ``model.json``."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy(src: Path, out: IO[bytes], digest: Any, chunk: int = 1 << 20) -> None:
    """Copy ``src`` into ``out``, feeding the same bytes to ``digest``."""
    with open(src, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            out.write(block)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_model_json(
    onnx_path: str | os.PathLike, *, classes: list[str], input_size: list[int], mean: list[float], std: list[float]
) -> dict[str, Any]:
    """The model.json of an exported graph (not yet published: ``id`` None); hashes ``onnx_path``."""
    return {
        "format": FORMAT,
        "id": None,
        "classes": list(classes),
        "input_size": list(input_size),
        "size_divisor": 32,
        "mean": list(mean),
        "std": list(std),
        "color": "RGB",
        "sha256": sha256_file(onnx_path),
    }


def write_model_json(folder: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write ``folder/model.json`` atomically."""
    return atomic_write_json(Path(folder) / META_FILE, info, indent=2)


def read_model_json(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {META_FILE}; not an exported model folder") from None
    except json.JSONDecodeError as e:
        raise ModelIntegrityError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(info, dict) or "sha256" not in info:
        raise ModelIntegrityError(f"{path}: no sha256 recorded")
    return info


def verify_folder(folder: str | os.PathLike, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check that ``folder/model.onnx`` hashes to the sha256 in ``model.json``; returns model.json."""
    info = info if info is not None else read_model_json(folder)
    onnx_path = Path(folder) / ONNX_FILE
    if not onnx_path.is_file():
        raise ModelIntegrityError(f"{folder}: {ONNX_FILE} is missing")
    _check_hash(onnx_path, sha256_file(onnx_path), info)
    return info


def read_verified(folder: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """model.json and the bytes of model.onnx, checked against each other (``ModelIntegrityError``)."""
    info = read_model_json(folder)
    onnx_path = Path(folder) / ONNX_FILE
    try:
        data = onnx_path.read_bytes()
    except FileNotFoundError:
        raise ModelIntegrityError(f"{folder}: {ONNX_FILE} is missing") from None
    _check_hash(onnx_path, sha256_bytes(data), info)
    return info, data


def _check_hash(onnx_path: Path, actual: str, info: dict[str, Any]) -> None:
    if actual != info["sha256"]:
        raise ModelIntegrityError(
            f"{onnx_path}: sha256 {actual} does not match the recorded {info['sha256']}; "
            "the file was modified or damaged after export"
        )


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (digits) runs on this machine; True when that cannot be told."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


class Registry:
    """Models under ``root``, one folder each, named by model id."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def publish(self, src_dir: str | os.PathLike, *, model_id: str | None = None) -> dict[str, Any]:
        """Copy an exported model folder into the registry as ``root/<model_id>/``; returns its model.json.

        The bytes of ``model.onnx`` are hashed once, as they are copied, and checked against the source's
        model.json: what is served is what was exported, and a model damaged between export and publishing
        is refused (``ModelIntegrityError``). The folder appears under its final name in one rename.
        Publishing an id that exists raises ``FileExistsError``.
        """
        src = Path(src_dir)
        info = read_model_json(src)
        if not (src / ONNX_FILE).is_file():
            raise ModelIntegrityError(f"{src}: {ONNX_FILE} is missing")
        model_id = f"mdl_{secrets.token_hex(8)}" if model_id is None else model_id
        self._check_id(model_id)
        final = self.root / model_id
        if final.exists():
            raise FileExistsError(f"model {model_id!r} is already published")
        # A publisher of this id killed mid-copy (a SIGKILLed worker: bench/chaos.py saw it) left its folder;
        # the folder names its process, and one whose process is gone is nobody's now.
        for stale in self.root.glob(f".tmp-{model_id}-*"):
            if not _alive(stale.name.removeprefix(f".tmp-{model_id}-").split("-")[0]):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-{model_id}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            digest = hashlib.sha256()
            atomic_write(tmp / ONNX_FILE, lambda out: _copy(src / ONNX_FILE, out, digest))
            _check_hash(src / ONNX_FILE, digest.hexdigest(), info)
            info = {k: info[k] for k in RUNTIME_KEYS if k in info} | {"id": model_id, "published_at": _now()}
            write_model_json(tmp, info)
            try:
                os.rename(tmp, final)  # atomic; fails if another publisher took the id meanwhile
            except OSError as e:
                raise FileExistsError(f"model {model_id!r} is already published") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info

    def list(self) -> list[dict[str, Any]]:
        """model.json of every published model, newest first. Folders being published are not listed."""
        models = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                models.append(read_model_json(folder))
            except (FileNotFoundError, ModelIntegrityError):
                continue
        return sorted(
            models, key=lambda m: (m.get("published_at") or m.get("created_at") or "", m.get("id") or ""), reverse=True
        )

    def get(self, model_id: str) -> dict[str, Any]:
        """model.json of one model; ``KeyError`` if there is none."""
        try:
            return read_model_json(self.path(model_id))
        except FileNotFoundError:
            raise KeyError(model_id) from None

    def path(self, model_id: str) -> Path:
        """The folder holding ``model.onnx`` (``KeyError`` for a malformed id)."""
        self._check_id(model_id, KeyError)
        return self.root / model_id

    def verify(self, model_id: str) -> dict[str, Any]:
        """sha256 check of a published model; raises ``ModelIntegrityError`` on a mismatch."""
        return verify_folder(self.path(model_id), self.get(model_id))

    def latest(self) -> dict[str, Any] | None:
        models = self.list()
        return models[0] if models else None

    @staticmethod
    def _check_id(model_id: str, exc: type[Exception] = ValueError) -> None:
        if not isinstance(model_id, str) or not _ID.match(model_id):
            raise exc(f"invalid model id {model_id!r}: letters, digits, '_', '.', '-' only")

"""Published models: a folder per model holding ``model.onnx`` and ``model.json``. Torch-free.

``model.json`` (written by ``deploy.export``, completed by ``Registry.publish``)::

    {"format": "ld-service-model/1", "id": "mdl_..." | null, "arch": "gfl_r18", "classes": [...],
     "num_classes": C, "input_size": [long, short], "size_divisor": 32, "mean": [...], "std": [...],
     "source_job": "job_..." | null, "metrics": {"AP": ...}, "export": {"fp16": false, "opset": 18, ...},
     "graph": {"nodes": ..., "parameters": ..., "ops": {...}}, "sha256": "<of model.onnx>",
     "size_bytes": ..., "created_at": "2026-11-24T15:00:00Z", ...}

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
from typing import Any

FORMAT = "ld-service-model/1"
ONNX_FILE, META_FILE = "model.onnx", "model.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ModelIntegrityError(ValueError):
    """``model.onnx`` is missing, or its sha256 is not the one recorded in ``model.json``."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_model_json(
    onnx_path: str | os.PathLike, *, arch: str, classes: list[str], input_size: list[int], mean: list[float],
    std: list[float], metrics: dict | None = None, export: dict | None = None, graph: dict | None = None,
    source: dict | None = None, extra: dict | None = None,
) -> dict[str, Any]:
    """The description of an exported model; ``extra`` keys (e.g. ``source_job``, ``metrics``, ``name``)
    override the defaults."""
    info: dict[str, Any] = {
        "format": FORMAT,
        "id": None,
        "arch": arch,
        "classes": list(classes),
        "num_classes": len(classes),
        "input_size": list(input_size),
        "size_divisor": 32,
        "mean": list(mean),
        "std": list(std),
        "color": "RGB",
        "source_job": None,
        "source": source or {},
        "metrics": metrics or {},
        "export": export or {},
        "graph": graph or {},
        "sha256": sha256_file(onnx_path),
        "size_bytes": os.path.getsize(onnx_path),
        "created_at": _now(),
    }
    info.update(extra or {})
    return info


def write_model_json(folder: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write ``folder/model.json`` atomically (temporary file + rename)."""
    path = Path(folder) / META_FILE
    tmp = path.with_name(f".{META_FILE}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


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
        raise ModelIntegrityError(f"{onnx_path}: sha256 {actual} does not match the recorded {info['sha256']}; "
                                  "the file was modified or damaged after export")


class Registry:
    """Models under ``root``, one folder each, named by model id."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def publish(self, src_dir: str | os.PathLike, *, model_id: str | None = None,
                meta: dict | None = None) -> dict[str, Any]:
        """Copy an exported model folder into the registry as ``root/<model_id>/``; returns its model.json.

        The source's sha256 is checked first (a model damaged between export and publishing is refused),
        ``meta`` is merged into model.json, and the folder appears under its final name in one rename.
        Publishing an id that exists raises ``FileExistsError``.
        """
        src = Path(src_dir)
        info = verify_folder(src)
        model_id = f"mdl_{secrets.token_hex(8)}" if model_id is None else model_id
        self._check_id(model_id)
        final = self.root / model_id
        if final.exists():
            raise FileExistsError(f"model {model_id!r} is already published")
        tmp = self.root / f".tmp-{model_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            shutil.copyfile(src / ONNX_FILE, tmp / ONNX_FILE)
            info = {**info, **(meta or {}), "id": model_id, "sha256": info["sha256"], "published_at": _now()}
            verify_folder(tmp, info)  # the copy is what will be served: hash it, not the source
            write_model_json(tmp, info)
            for f in (tmp / ONNX_FILE, tmp / META_FILE):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
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
        return sorted(models, key=lambda m: (m.get("published_at") or m.get("created_at") or "", m.get("id") or ""),
                      reverse=True)

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


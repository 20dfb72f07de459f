"""What identifies a run and what restores it exactly: the fingerprint a checkpoint must match to be resumed,
and the random number generators' states saved in each checkpoint (as plain tensors, lists and ints, so the
checkpoint loads with ``weights_only=True``)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from distill.files import sha256_file
from distill.spec import InitPath, LocalJobSpec


def run_fingerprint(spec: LocalJobSpec, data_digest: str) -> dict[str, Any]:
    """What decides a run's result: the spec without its cosmetic fields, the data's digest and the
    teacher checkpoint's sha256 (a path can be overwritten by another teacher). Stored in each checkpoint;
    a checkpoint is resumed only by a run with an equal fingerprint."""
    # Paths are replaced by digests of what they hold: a moved dataset still resumes, a rewritten one not.
    fields = spec.model_dump(mode="json", exclude={"name", "dataset", "export"})  # export comes after training
    fields["schedule"].pop("num_workers", None)  # loading is seeded per (seed, epoch, image): no effect
    fields["schedule"].pop("gpus", None)  # the global batch is the same over any number of processes
    fields["data_sha256"] = data_digest
    if spec.teacher is not None:
        fields["teacher"] = {"sha256": sha256_file(spec.teacher.path)}
    if isinstance(spec.student.init, InitPath):
        fields["student"]["init"] = {"sha256": sha256_file(spec.student.init.path)}
    return fields


def differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _numpy_state() -> list[Any]:
    # Plain lists and ints so the checkpoint loads with weights_only=True.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]

"""Turn a service job spec (dataset id, teacher model/job/checkpoint id) into the local spec that
``python -m distill train`` runs (dataset folder, teacher ``{"path": ...}``). Torch-free, so the API
can call ``resolve_spec`` to refuse a job before it is queued.

The teacher check here reads only metadata the store already has (an uploaded checkpoint's inferred
architecture, a published model's model.json); the training child repeats it on the loaded models
(``distill.distillation.check_teacher``), which is the authoritative check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distill.spec import JobSpec
from worker.settings import Settings
from worker.store import Store

# Every architecture of distill.spec.ARCHITECTURES uses these (DESIGN section 2).
STUDENT_REG_MAX = 16
STUDENT_STRIDES = [8, 16, 32, 64, 128]


class JobRefused(ValueError):
    """The job cannot run as specified; the message says why (shown to the user)."""


def resolve_spec(spec: dict[str, Any], store: Store, settings: Settings) -> dict[str, Any]:
    """The spec with local paths for ``python -m distill train``; raises ``JobRefused``."""
    try:
        job = JobSpec.model_validate(spec)
    except ValidationError as e:
        raise JobRefused(f"invalid job spec: {e}") from e
    dataset = store.get_dataset(job.dataset)
    if dataset is None:
        raise JobRefused(f"unknown dataset {job.dataset!r}")
    if not Path(dataset["path"]).is_dir():
        raise JobRefused(f"dataset {job.dataset} has no folder at {dataset['path']}")
    local = job.model_dump(mode="json")
    local["dataset"] = dataset["path"]
    if job.kind == "distill":
        assert job.teacher is not None
        path, info = teacher_checkpoint(job.teacher.model_dump(), store, settings)
        if problem := teacher_mismatch(info, dataset["classes"]):
            raise JobRefused(problem)
        local["teacher"] = {"path": str(path)}
    return local


def teacher_checkpoint(teacher: dict[str, Any], store: Store, settings: Settings) -> tuple[Path, dict[str, Any]]:
    """(local checkpoint path, architecture facts) of a teacher given by model, job or checkpoint id."""
    if teacher.get("path"):
        raise JobRefused("teacher 'path' is for local runs; give a model, job or checkpoint id")
    if cid := teacher.get("checkpoint"):
        ckpt = store.get_checkpoint(cid)
        if ckpt is None:
            raise JobRefused(f"unknown teacher checkpoint {cid!r}")
        return _existing(Path(ckpt["path"]), f"checkpoint {cid}"), ckpt["arch"] or {}
    if mid := teacher.get("model"):
        model = store.get_model(mid)
        if model is None:
            raise JobRefused(f"unknown teacher model {mid!r}")
        # The published folder holds the ONNX graph; the PyTorch weights stay with the job that made it.
        candidates = [Path(model["path"]) / "model.pt"]
        if model["job_id"]:
            candidates.append(settings.run_dir(model["job_id"]) / "model.pt")
        for c in candidates:
            if c.is_file():
                return c, model["meta"] or {}
        raise JobRefused(f"teacher model {mid} has no PyTorch checkpoint left (looked at {candidates})")
    if jid := teacher.get("job"):
        job = store.get_job(jid)
        if job is None:
            raise JobRefused(f"unknown teacher job {jid!r}")
        if job["state"] != "succeeded":
            raise JobRefused(f"teacher job {jid} is {job['state']}, not succeeded")
        model = store.model_for_job(jid)
        return _existing(settings.run_dir(jid) / "model.pt", f"job {jid}"), (model or {}).get("meta") or {}
    raise JobRefused("teacher needs exactly one of 'model', 'job', 'checkpoint'")


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise JobRefused(f"teacher {what}: checkpoint file {path} is missing")
    return path


def _fact(info: dict[str, Any], key: str) -> Any:
    """``key`` from the top level of architecture facts or a nested dict (model.json keeps reg_max and
    strides under ``export``)."""
    if key in info and info[key] is not None:
        return info[key]
    for nested in ("config", "arch", "architecture", "export"):
        sub = info.get(nested)
        if isinstance(sub, dict) and sub.get(key) is not None:
            return sub[key]
    return None


def teacher_mismatch(info: dict[str, Any], classes: list[str]) -> str | None:
    """Why a teacher with architecture facts ``info`` cannot teach a student of ``classes``, or None.

    Facts that ``info`` lacks are not checked here (the training child checks the loaded models).
    """
    problems = []
    reg_max = _fact(info, "reg_max")
    if reg_max is not None and int(reg_max) != STUDENT_REG_MAX:
        problems.append(f"reg_max {reg_max} != student's {STUDENT_REG_MAX}")
    strides = _fact(info, "strides")
    if strides is not None and [int(s) for s in strides] != STUDENT_STRIDES:
        problems.append(f"strides {list(strides)} != student's {STUDENT_STRIDES}")
    t_classes = _fact(info, "classes")
    num = _fact(info, "num_classes")
    if t_classes:
        if list(t_classes) != list(classes):
            problems.append(f"classes {list(t_classes)} != the dataset's {list(classes)}")
    elif num is not None and int(num) != len(classes):
        problems.append(f"{num} classes != the dataset's {len(classes)}")
    return ("teacher does not match the student: " + "; ".join(problems)) if problems else None

"""The one job check (DESIGN section 1): the API calls :func:`check_job` before queueing a job, the worker
calls :func:`resolve_job` (which checks the same way) before running it. Torch-free.

A job names its files only by id (dataset, teacher, initial weights); this module looks them up in the
store, refuses what cannot run, with the reason, and turns the ids into the local paths that
``python -m distill train`` takes (``distill.spec.LocalJobSpec``). Architecture facts come from the one
torch-free checkpoint reader (``distill.ckpt_reader``) and the one architecture table
(``distill.spec.arch_config``), the same ones training uses.
"""

from __future__ import annotations

import math
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.artifacts import artifacts_for, run_key
from core.settings import Settings
from core.store import Store
from core.tenants import visible
from distill.ckpt_layout import describe_checkpoint
from distill.ckpt_reader import CheckpointError
from distill.class_map import ClassMapError, map_classes
from distill.data.annotations import draw_val
from distill.pairing import pair_problems
from distill.spec import (
    IMAGENET_URLS,
    NUM_ANCHORS,
    InitCheckpoint,
    JobSpec,
    arch_config,
    crosskd_layer_problem,
    teacher_cache_refusal,
)

# An id in the job that names nothing the caller may see (none, or another tenant's): 404, as a GET of it.
NOT_FOUND = 404
DEFAULT_VAL_SPLIT = 0.2  # a data set recorded without a split, and a job that gives none: the old default


class JobRefused(ValueError):
    """The job cannot run as specified. ``message`` is shown to the user; ``status`` is the HTTP status the
    API answers with, ``code`` the error code of its body."""

    def __init__(
        self, message: str, code: str = "invalid_job", status: int = 422, details: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.message, self.code, self.status, self.details = message, code, status, details


@dataclass
class CheckedJob:
    """A job that passed the check, with its files as storage keys (``core.artifacts``)."""

    spec: JobSpec
    dataset_key: str
    dataset_classes: list[str]
    teacher_key: str | None
    teacher_facts: dict[str, Any] | None
    init_key: str | None
    # The data set's split as the training draws it (LocalJobSpec val_split, split_seed), and what
    # ``teacher_overlap`` found (None for a train job).
    val_split: float = DEFAULT_VAL_SPLIT
    split_seed: int = 0
    teacher_overlap: dict[str, Any] | None = None


def check_job(spec: JobSpec, store: Store, settings: Settings, scope: str | None = None) -> CheckedJob:
    """Refuse (raise :class:`JobRefused`) a job the worker could not run: unknown dataset, checkpoint or
    teacher, a teacher job that did not succeed, initial weights that do not fit the student or are
    neither cached nor downloadable, a teacher whose ``reg_max`` or strides differ from the student's,
    a class map naming unknown classes, ``distill.teacher_cache: "on"`` where the cache cannot apply.

    ``scope``: the tenant whose datasets, checkpoints, jobs and models the job may name (``core.tenants``;
    None: any). Another tenant's id is refused exactly as an id that names nothing.
    """
    ds = _get(store.get_dataset, spec.dataset, scope)
    if ds is None:
        raise JobRefused(
            f"dataset: no dataset {spec.dataset!r} (upload one to /v1/datasets)", "unknown_dataset", NOT_FOUND
        )
    artifacts = artifacts_for(settings)
    if not artifacts.exists(ds["key"]):
        raise JobRefused(f"dataset {spec.dataset} has lost its files", "unknown_dataset")
    val_split, split_seed = _split(spec, ds)
    if refusal := teacher_cache_refusal(spec):
        raise JobRefused(refusal, "invalid_teacher_cache")
    student = arch_config(spec.student.arch)
    init_key = _check_init(spec, store, settings, student, scope)
    teacher_key, facts = None, None
    if spec.teacher is not None:
        teacher_key, facts = _teacher(spec.teacher.model_dump(), store, settings, scope)
        _check_teacher(facts, student, spec)
        if spec.distill is not None and spec.distill.crosskd_layer is not None and facts.get("stacked_convs"):
            problem = crosskd_layer_problem(
                spec.distill.crosskd_layer, int(student["stacked_convs"]), int(facts["stacked_convs"])
            )
            if problem:
                raise JobRefused(problem, "invalid_crosskd_layer", details={"field": "distill.crosskd_layer"})
        if spec.distill is not None and spec.distill.class_map:
            # The rule training applies (distill.class_map); a teacher without names has "0".."N-1", as GFL.classes.
            teacher_classes = facts.get("classes") or [str(i) for i in range(int(facts.get("num_classes") or 0))]
            try:
                map_classes(ds["classes"], teacher_classes, spec.distill.class_map)
            except ClassMapError as e:
                raise JobRefused(str(e), "invalid_class_map") from e
    overlap = teacher_overlap(spec, ds, store)
    if overlap and overlap["seen"] and not overlap["allowed"]:
        raise JobRefused(
            f"teacher {overlap['teacher']} was trained on {overlap['seen']} of this job's {overlap['val_images']} "
            f"validation images (data set {ds['id']}, matched by content): its AP there is inflated and "
            "distillation would pass their labels on. Teach with a model trained on none of them (e.g. on this "
            "data set's training split), or set distill.allow_teacher_overlap: true to run anyway",
            "teacher_saw_validation",
            details={**overlap, "field": "distill.allow_teacher_overlap"},
        )
    return CheckedJob(spec, ds["key"], list(ds["classes"]), teacher_key, facts, init_key, val_split, split_seed,
                      overlap)  # fmt: skip


def resolve_job(spec: dict[str, Any], store: Store, settings: Settings) -> dict[str, Any]:
    """The local spec (``LocalJobSpec`` JSON) of a stored job, for ``python -m distill train``; checks the
    job again (files may have gone since it was queued) and raises :class:`JobRefused`. Tenants were checked at
    submit (an admin's job may name any tenant's files), so this check sees every tenant's rows."""
    try:
        job = JobSpec.model_validate(spec)
    except ValidationError as e:
        raise JobRefused(f"invalid job spec: {e}") from e
    checked = check_job(job, store, settings)
    artifacts = artifacts_for(settings)
    try:  # with object storage: fetched into this machine's cache and checked by sha256
        dataset_dir = artifacts.tree(checked.dataset_key)
        init = artifacts.file(checked.init_key) if checked.init_key else None
        teacher = artifacts.file(checked.teacher_key) if checked.teacher_key else None
    except FileNotFoundError as e:
        raise JobRefused(f"a file of the job is gone from the storage: {e}", "unknown_dataset") from e
    artifacts.evict(keep=[p for p in (dataset_dir, init, teacher) if p is not None])
    local = job.model_dump(mode="json")
    local["dataset"] = str(dataset_dir)
    if init is not None:
        local["student"]["init"] = {"path": str(init)}
    if teacher is not None:
        local["teacher"] = {"path": str(teacher)}
    local.update(val_split=checked.val_split, split_seed=checked.split_seed, teacher_overlap=checked.teacher_overlap)
    return local


# ----------------------------------------------------------------------------------------------- split


def _split(spec: JobSpec, ds: dict[str, Any]) -> tuple[float, int]:
    """``(val_split, split_seed)`` of the draw that splits the data set when its images name no split: the data
    set's, fixed at upload. A job's ``val_split`` (deprecated) may only repeat it; a data set recorded without a
    draw (its images' own split decides, or a row from before splits were stored) takes the job's, seed 0."""
    if ds.get("val_split") is None:
        return (DEFAULT_VAL_SPLIT if spec.val_split is None else spec.val_split), int(ds.get("split_seed") or 0)
    if spec.val_split is not None and not math.isclose(spec.val_split, ds["val_split"]):
        raise JobRefused(
            f"val_split {spec.val_split}: data set {ds['id']}'s split was fixed at upload (val_split "
            f"{ds['val_split']}, split_seed {ds['split_seed']}) and every job on it uses that split; leave val_split "
            "out (it is deprecated), or upload the data set again with the val_split you want",
            "split_conflict",
            details={"field": "val_split", "val_split": ds["val_split"], "split_seed": ds["split_seed"]},
        )
    return float(ds["val_split"]), int(ds["split_seed"] or 0)


def teacher_overlap(spec: JobSpec, ds: dict[str, Any], store: Store) -> dict[str, Any] | None:
    """How many of the job's validation images its teacher was trained on, matched by content hash (the same
    picture in another data set counts): ``{teacher, teacher_job, val_images, seen, allowed}``; ``seen`` is None
    where it cannot be known, with ``why``: a teacher that is an uploaded checkpoint (its training data is
    unknown: never refused), or images the store does not know. None for a train job."""
    if spec.teacher is None or spec.distill is None:
        return None
    allowed = spec.distill.allow_teacher_overlap
    t = spec.teacher
    if t.checkpoint:
        why = "an uploaded checkpoint: the images it was trained on are unknown"
        return {"teacher": f"checkpoint {t.checkpoint}", "teacher_job": None, "val_images": None, "seen": None,
                "allowed": allowed, "why": why}  # fmt: skip
    model = store.get_model(t.model) if t.model else None
    job_id = model["job_id"] if model else t.job
    teacher = f"model {t.model} (job {job_id})" if t.model else f"job {job_id}"
    job = store.get_job(job_id) if job_id else None
    images = store.dataset_images(ds["id"])
    val = [im["sha256"] for im in images if im["split"] == "val"]
    trained = _trained_on(store, job) if job else None
    out = {"teacher": teacher, "teacher_job": job_id, "val_images": len(val), "allowed": allowed}
    if trained is None or not images:
        return {**out, "seen": None, "why": "the store does not know the images of the teacher's or this data set"}
    return {**out, "seen": sum(h in trained for h in val)}


def _trained_on(store: Store, job: dict[str, Any]) -> set[str] | None:
    """Content hashes of the images a job trained on: its data set's training part, or for a job from before
    data sets had their split (``jobs.split_draw``) the draw it made itself. None when the store does not know
    the data set's images."""
    images = store.dataset_images(str(job["spec"].get("dataset")))
    if not images:
        return None
    if draw := job.get("split_draw"):
        val = draw_val([im["image_id"] for im in images], float(draw["val_split"]), int(draw["seed"]))
        return {im["sha256"] for im in images if im["image_id"] not in val and im["split"] != "test"}
    return {im["sha256"] for im in images if im["split"] == "train"}


# ----------------------------------------------------------------------------------------------- init


def _get(get: Callable[[str], dict[str, Any] | None], id: str, scope: str | None) -> dict[str, Any] | None:
    """``get(id)`` if the caller of ``scope`` may see it, else None (as if it did not exist)."""
    row = get(id)
    return row if visible(row, scope) else None


def _check_init(
    spec: JobSpec, store: Store, settings: Settings, student: dict[str, Any], scope: str | None
) -> str | None:
    init = spec.student.init
    if init == "imagenet":
        _check_imagenet(spec.student.arch, settings.weights_dir)
        return None
    if not isinstance(init, InitCheckpoint):
        return None
    ck = _get(store.get_checkpoint, init.checkpoint, scope)
    if ck is None:
        raise JobRefused(
            f"student.init: no checkpoint {init.checkpoint!r} (upload one to /v1/checkpoints)",
            "unknown_checkpoint",
            NOT_FOUND,
        )
    facts = ck["arch"] or {}
    layout = (facts.get("depth"), facts.get("base_width"))
    if layout != (student["depth"], student["base_width"]):
        what = "backbone" if facts.get("kind") == "backbone" else "detector's backbone"
        raise JobRefused(
            f"student.init: checkpoint {init.checkpoint} holds a {what} ResNet-{facts.get('depth')} of width "
            f"{facts.get('base_width')}; {spec.student.arch} has ResNet-{student['depth']} of width "
            f"{student['base_width']}, so none of its backbone would load",
            "invalid_init",
        )
    return _existing(settings, ck["key"], f"student.init: checkpoint {init.checkpoint}", "invalid_init")


def weights_cache_dir(weights_dir: Path | None) -> Path:
    """Where torchvision keeps downloaded weights: ``weights_dir`` (``LDD_WEIGHTS_DIR``) or, as torch.hub
    computes it, ``$TORCH_HOME/hub/checkpoints`` (``$TORCH_HOME`` defaulting to ``$XDG_CACHE_HOME/torch``,
    ``~/.cache/torch``)."""
    if weights_dir is not None:
        return Path(weights_dir)
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.environ.get("TORCH_HOME", os.path.join(cache, "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


_reachable: dict[str, tuple[float, bool]] = {}


def _downloadable(url: str, timeout_s: float = 3.0, remember_s: float = 60.0) -> bool:
    """Whether ``url`` answers (a HEAD request); remembered for a minute so a burst of submits on an
    offline machine waits once, not once per job."""
    now = time.monotonic()
    if url in _reachable and now - _reachable[url][0] < remember_s:
        return _reachable[url][1]
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s) as r:
            ok = 200 <= r.status < 400
    except OSError:
        ok = False
    _reachable[url] = (now, ok)
    return ok


def _check_imagenet(arch: str, weights_dir: Path | None) -> None:
    url = IMAGENET_URLS[arch]
    folder = weights_cache_dir(weights_dir)
    name = url.rsplit("/", 1)[1]
    if (folder / name).is_file() or _downloadable(url):
        return
    raise JobRefused(
        f"student.init 'imagenet': torchvision's weights file {name} is not in the cache folder {folder} and "
        f"{url} cannot be reached from this server; put the file into {folder} (or set LDD_WEIGHTS_DIR), "
        "or upload a backbone with POST /v1/checkpoints and use init {'checkpoint': id}",
        "weights_missing",
        details={"file": name, "folder": str(folder), "url": url},
    )


# ----------------------------------------------------------------------------------------------- teacher


def _teacher(
    teacher: dict[str, Any], store: Store, settings: Settings, scope: str | None
) -> tuple[str, dict[str, Any]]:
    """(storage key of its checkpoint, architecture facts) of a teacher given by model, job or checkpoint id."""
    if cid := teacher.get("checkpoint"):
        ck = _get(store.get_checkpoint, cid, scope)
        if ck is None:
            raise JobRefused(f"teacher: no checkpoint {cid!r}", "invalid_teacher", NOT_FOUND)
        facts = ck["arch"] or {}
        if facts.get("kind", "detector") != "detector":
            raise JobRefused(
                f"teacher: checkpoint {cid} is a {facts.get('kind')}, not a GFL detector", "invalid_teacher"
            )
        return _existing(settings, ck["key"], f"checkpoint {cid}"), facts
    if mid := teacher.get("model"):
        model = _get(store.get_model, mid, scope)
        if model is None:
            raise JobRefused(f"teacher: no model {mid!r}", "invalid_teacher", NOT_FOUND)
        if not model["job_id"]:
            raise JobRefused(
                f"teacher: model {mid} was not made by a job here; its PyTorch weights are not "
                "kept (upload them to /v1/checkpoints)",
                "invalid_teacher",
            )
        return _job_checkpoint(model["job_id"], settings, f"model {mid}")
    jid = teacher["job"]
    job = _get(store.get_job, jid, scope)
    if job is None:
        raise JobRefused(f"teacher: no job {jid!r}", "invalid_teacher", NOT_FOUND)
    if job["state"] != "succeeded":
        raise JobRefused(f"teacher: job {jid} is {job['state']}, not succeeded", "invalid_teacher")
    return _job_checkpoint(jid, settings, f"job {jid}")


def _job_checkpoint(job_id: str, settings: Settings, what: str) -> tuple[str, dict[str, Any]]:
    # The published folder holds the ONNX graph; the PyTorch weights stay with the job that made them. Its
    # architecture is read from the file (fetched into the cache with object storage; kept for the worker).
    key = _existing(settings, run_key(job_id, "model.pt"), what)
    try:
        return key, describe_checkpoint(artifacts_for(settings).file(key))
    except CheckpointError as e:
        raise JobRefused(f"teacher {what}: {e}", "invalid_teacher") from e
    except FileNotFoundError as e:
        raise JobRefused(f"{what}: its checkpoint file is gone from the server", "invalid_teacher") from e


def _existing(settings: Settings, key: str, what: str, code: str = "invalid_teacher") -> str:
    if not artifacts_for(settings).exists(key):
        raise JobRefused(f"{what}: its checkpoint file is gone from the server", code)
    return key


def _check_teacher(facts: dict[str, Any], student: dict[str, Any], spec: JobSpec) -> None:
    """The one pairing rule (``distill.pairing``): same reg_max and strides, anchors per location that match,
    and a method the pair can run. Families and classes need not agree (KD maps classes by name; LD carries
    no class)."""
    student_facts = {**student, "num_anchors": NUM_ANCHORS[str(student["family"])]} if "family" in student else student
    weight = spec.distill.weights.value if spec.distill is not None else None
    if problems := pair_problems(facts, student_facts, weight):
        raise JobRefused(
            "teacher does not match the student: " + "; ".join(problems),
            "teacher_mismatch",
        )

"""The teacher-output cache (``distill.teacher_cache``, DESIGN section 3): cached losses equal live ones within
fp16 rounding, both flips; no term reads a location the cache does not hold; off (with the reason) where it
cannot apply and refused when asked for there; a partial or torn cache is resumed; a training process killed
with SIGKILL while filling it loses nothing but time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from distill.checkpoint import atomic_save, build_detector, detector_state
from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.data.annotations import load_coco, split
from distill.data.dataset import DetectionDataset, collate, set_epoch
from distill.data.sampler import EpochSampler
from distill.data.synthetic import make_synthetic
from distill.models.gfl import GFL, DetectorConfig
from distill.spec import DistillSpec, GFLWeights, JobSpec, LocalJobSpec, teacher_cache_blocker
from distill.task_criteria import GFLCriterion
from distill.teacher_cache import _RECORD, CacheOff, CacheRefused, TeacherCache, attach
from distill.train import Trainer, TrainingError

SIZE = (128, 96)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("synth"), num_train=8, num_val=2, image_size=SIZE, seed=3)


def _tiny(seed: int, classes: list[str], perturb: int) -> GFL:
    torch.manual_seed(seed)
    model = GFL(
        DetectorConfig(depth=18, base_width=16, channels=32, stacked_convs=2, num_classes=len(classes), classes=classes)
    )
    g = torch.Generator().manual_seed(perturb)  # head far from its flat start, so every term is well above 0
    with torch.no_grad():
        for conv in (model.bbox_head.gfl_reg, model.bbox_head.gfl_cls):
            conv.weight.add_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    return model


def _criterion(student: GFL, teacher: GFL, spec: DistillSpec) -> DistillCriterion:
    return DistillCriterion(
        GFLCriterion(student, GFLWeights()), teacher, spec, map_classes(student.classes, teacher.classes)
    )


def _loader(data_dir: Path, n: int, seed: int = 1) -> DataLoader:
    data = load_coco(data_dir)
    ids = split(data, 0.0, 0)[0][:n]
    ds = DetectionDataset(data, ids, image_size=SIZE, train=True, seed=seed)
    return DataLoader(ds, batch_size=2, sampler=EpochSampler(len(ds), seed=seed), collate_fn=collate)


def _close(reg, cls, out, i: int, at: torch.Tensor) -> None:
    """Stored fp16 rows ``reg (K, 68)``, ``cls (K_c, C)`` against live outputs of image ``i`` at ``at (K,)``."""
    torch.testing.assert_close(
        torch.from_numpy(reg.astype("float32")).reshape(-1, 4, 17), out.reg[i, at], rtol=1e-3, atol=2e-3
    )
    torch.testing.assert_close(
        torch.from_numpy(cls.astype("float32")), out.cls[i, at[: len(cls)]], rtol=1e-3, atol=2e-3
    )


def _same(cached: dict, live: dict) -> None:
    """Per-term losses equal within what fp16 teacher logits change (relative 1e-3 of a logit)."""
    assert list(cached) == list(live)
    for k in live:
        assert torch.isfinite(cached[k]), k
        torch.testing.assert_close(cached[k], live[k], rtol=2e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize(
    "weights",
    [
        {"vlr_kd": 0.5, "tbr": 1.0},  # sparse: Main region + VLR rows
        {"main_kd": 0, "bckd_cls": 1.0, "bckd_loc": 1.0},
    ],
)  # BCKD: dense rows
@torch.no_grad()
def test_cached_losses_equal_live_both_flips(data_dir, tmp_path, weights):
    loader = _loader(data_dir, 4)
    classes = loader.dataset.data.classes
    student, teacher = _tiny(0, classes, 4), _tiny(1, classes, 2)
    spec = DistillSpec.model_validate({"weights": weights})
    live, cached = _criterion(student, teacher, spec), _criterion(student, teacher, spec)
    # NaN where the cache holds nothing: a term reading any other location would give a NaN loss.
    cache = TeacherCache(tmp_path / "cache", cached, fill=float("nan"))
    cached.teacher_source = cache
    assert cache.layout.dense == ("bckd_cls" in weights)
    for epoch in range(3):  # epochs 0 and 1 fill (seed 1 flips each image both ways), epoch 2 reads only
        set_epoch(loader, epoch)
        hits_before, seen = cache.hits, set()
        for images, targets in loader:
            _same(cached(images, targets), live(images, targets))
            seen |= {t["flipped"] for t in targets}
        if epoch == 2:
            assert cache.hits - hits_before == 4 and seen == {True, False}
    assert len(cache.index) == 7  # 4 images, both flips of 3 of them
    # The stored rows are the live teacher's, rounded to fp16, at the locations the terms read.
    set_epoch(loader, 2)
    images, targets = next(iter(loader))
    out = cached.teacher_forward(images)
    key = (targets[0]["image_id"], targets[0]["flipped"], images.shape[2], images.shape[3])
    locs, reg, cls = cache.read(key)
    at = torch.arange(out.reg.shape[1]) if locs is None else torch.from_numpy(locs.astype("int64"))
    assert len(at) > 0 and 0 < len(cls) <= len(at)  # class rows where KD reads them
    _close(reg, cls, out, 0, at)


@pytest.mark.parametrize(
    ("student_arch", "teacher_arch"), [("fcos_tiny", "retina_tiny"), ("retina_tiny", "gflv2_tiny")]
)
@torch.no_grad()
def test_cached_losses_equal_live_across_families(data_dir, tmp_path, student_arch, teacher_arch):
    """The cache holds the teacher as the terms read it (the student's rows, the quality folded into the
    scores): 9 -> 1 and a quality teacher -> 9 give the live losses, the student family's Main region decides
    what is stored."""
    from distill.checkpoint import build_detector
    from distill.task_criteria import task_criterion

    loader = _loader(data_dir, 2)
    classes = loader.dataset.data.classes
    torch.manual_seed(0)
    student, teacher = build_detector(student_arch, len(classes), classes), build_detector(teacher_arch, len(classes))
    spec = DistillSpec.model_validate({"weights": {"vlr_kd": 0.5, "tbr": 1.0}})
    live, cached = (
        DistillCriterion(task_criterion(student, GFLWeights()), teacher, spec, map_classes(classes, teacher.classes))
        for _ in range(2)
    )
    cache = TeacherCache(tmp_path / "cache", cached, fill=float("nan"))
    cached.teacher_source = cache
    for epoch in range(2):
        set_epoch(loader, epoch)
        for images, targets in loader:
            _same(cached(images, targets), live(images, targets))
    assert cache.hits > 0


def test_flip_mirrors_boxes_and_is_in_the_target(data_dir):
    data = load_coco(data_dir)
    ids = split(data, 0.0, 0)[0][:1]
    plain = DetectionDataset(data, ids, image_size=SIZE, train=True, flip_prob=0.0)[0]
    flipped = DetectionDataset(data, ids, image_size=SIZE, train=True, flip_prob=1.0)[0]
    assert plain[1]["flipped"] is False and flipped[1]["flipped"] is True
    assert plain[1]["image_id"] == flipped[1]["image_id"]
    width = plain[0].shape[-1]
    b = plain[1]["boxes"]
    mirrored = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)
    torch.testing.assert_close(flipped[1]["boxes"], mirrored)
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))


def _job(**over) -> dict:
    job = {
        "kind": "distill",
        "dataset": "ds_00000000",
        "teacher": {"model": "mdl_00000000"},
        "schedule": {"image_size": list(SIZE)},
    }
    for path, value in over.items():
        section, field = path.split("__")
        job.setdefault(section, {})
        if section == "distill" and field in DistillSpec.model_fields:
            job[section][field] = value
        elif section == "distill":
            job[section].setdefault("weights", {})[field] = value
        else:
            job[section][field] = value
    return job


def test_off_with_the_reason_and_on_refused_where_it_cannot_apply(data_dir, tmp_path):
    auto = JobSpec.model_validate(_job())
    assert teacher_cache_blocker(auto) is None
    cases = {
        "random scales": _job(schedule__scales=[[128, 96], [160, 120]]),
        "CrossKD": _job(distill__crosskd_cls=1.0),
        "FitNets": _job(distill__fitnets=1.0),
    }
    for words, job in cases.items():
        assert words.lower() in (teacher_cache_blocker(JobSpec.model_validate(job)) or "").lower()
    # One fixed scale given through schedule.scales is still a fixed scale.
    assert teacher_cache_blocker(JobSpec.model_validate(_job(schedule__scales=[[128, 96]]))) is None

    # Locally: "auto" switches off with the reason in train.log and in the report for metrics.json; "on" is a
    # TrainingError; "off" says so.
    classes = [str(d) for d in range(10)]
    teacher_path = tmp_path / "teacher.pt"
    atomic_save(detector_state(build_detector("gfl_tiny", len(classes), classes)), teacher_path)
    base = {
        "kind": "distill",
        "dataset": str(data_dir),
        "student": {"arch": "gfl_tiny"},
        "teacher": {"path": str(teacher_path)},
        "schedule": {"epochs": 1, "batch_size": 2, "image_size": list(SIZE), "num_workers": 0},
    }
    multi = {**base, "schedule": {**base["schedule"], "scales": [[128, 96], [160, 120]]}}
    trainer = Trainer(LocalJobSpec.model_validate(multi), tmp_path / "multi", device="cpu")
    assert isinstance(trainer.teacher_cache, CacheOff) and trainer.criterion.teacher_source is None
    report = trainer.teacher_cache.report()
    assert report["enabled"] is False and "random scales" in report["reason"] and report["hit_rate"] is None
    assert "teacher cache: off: random scales" in (tmp_path / "multi" / "train.log").read_text()
    on = {**multi, "distill": {"teacher_cache": "on"}}
    with pytest.raises(TrainingError, match="teacher_cache is 'on'.*random scales"):
        Trainer(LocalJobSpec.model_validate(on), tmp_path / "on", device="cpu")
    crosskd = LocalJobSpec.model_validate({**base, "distill": {"method": "crosskd", "teacher_cache": "on"}})
    with pytest.raises(CacheRefused, match="CrossKD"):
        attach(trainer.criterion, crosskd, tmp_path / "unused")
    off = LocalJobSpec.model_validate({**base, "distill": {"teacher_cache": "off"}})
    assert "off by the job" in attach(trainer.criterion, off, tmp_path / "unused", log=lambda _: None).reason


@torch.no_grad()
def test_resume_with_a_partial_and_a_torn_cache(data_dir, tmp_path):
    loader = _loader(data_dir, 6)
    classes = loader.dataset.data.classes
    student, teacher = _tiny(0, classes, 4), _tiny(1, classes, 2)
    spec = DistillSpec()
    live, cached = _criterion(student, teacher, spec), _criterion(student, teacher, spec)
    folder = tmp_path / "cache"
    first = TeacherCache(folder, cached, fingerprint={"run": 1})
    set_epoch(loader, 0)
    batches = list(loader)
    first(*batches[0])
    first(*batches[1])
    assert len(first.index) == 4
    # What a kill mid-entry leaves: rows of an entry without its record, then half a record.
    for name in ("reg.f16", "cls.f16", "locs.i32"):
        with open(folder / name, "ab") as f:
            f.write(b"\x01" * 2 * 68 * 3)
    with open(folder / "entries.bin", "ab") as f:
        f.write(b"\x02" * (_RECORD // 2))
    # And one finished entry whose bytes went bad on disk (its data CRC no longer matches).
    bad_key, (row0, *_) = next(iter(first.index.items()))
    with open(folder / "reg.f16", "r+b") as f:
        f.seek(row0 * 2 * 68)
        f.write(b"\xff\x7f" * 4)
    size = (folder / "entries.bin").stat().st_size

    second = TeacherCache(folder, cached, fingerprint={"run": 1})
    cached.teacher_source = second
    assert second.recovered == 4 and (folder / "entries.bin").stat().st_size == size - _RECORD // 2
    assert second.read(bad_key) is None  # never used: recomputed on its next lookup
    for images, targets in batches:
        _same(cached(images, targets), live(images, targets))
    assert second.hits == 3 and len(second.index) == 6
    # Default terms: class rows only where Main KD reads them (the Main region), edge rows there and on the VLR.
    images, targets = batches[0]
    locs, reg, cls = second.read((targets[0]["image_id"], targets[0]["flipped"], *images.shape[2:]))
    with_cls, edges_only = second.stored_locations(targets[:1], cached.teacher_forward(images[:1]).sizes, "cpu")
    assert 0 < len(cls) == int(with_cls.sum()) < len(reg) == len(cls) + int(edges_only.sum())
    # Two processes of one job (DDP ranks) share a folder: each appends whole entries under the lock, and takes
    # in the other's when it misses instead of running the teacher.
    shared = tmp_path / "shared"
    rank0, rank1 = (TeacherCache(shared, _criterion(student, teacher, spec)) for _ in range(2))
    rank0(*batches[0])
    rank1(*batches[0])
    rank1(*batches[1])
    rank0(*batches[1])
    rank0(*batches[2])
    assert (rank0.hits, rank1.hits) == (2, 2)
    merged = TeacherCache(shared, cached)
    assert merged.recovered == 6
    for key in merged.index:
        owner = rank0 if key in rank0.index else rank1
        for got, want in zip(merged.read(key), owner.read(key), strict=True):
            assert (got == want).all()
    # Another run's fingerprint (teacher, data, sizes) starts afresh.
    assert TeacherCache(folder, cached, fingerprint={"run": 2}).recovered == 0


def _progress(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    return {s["iter"]: s["losses"] for s in lines if s["phase"] == "train" and s["losses"]}


def test_a_process_killed_while_filling_loses_nothing_but_time(data_dir, tmp_path):
    classes = [str(d) for d in range(10)]
    teacher_path = tmp_path / "teacher.pt"
    atomic_save(detector_state(_tiny(1, classes, 2), {"classes": classes}), teacher_path)
    job = {
        "kind": "distill",
        "dataset": str(data_dir),
        "student": {"arch": "gfl_tiny"},
        "teacher": {"path": str(teacher_path)},
        "distill": {"weights": {"vlr_kd": 0.5}},
        "schedule": {"epochs": 2, "batch_size": 1, "image_size": list(SIZE), "num_workers": 0, "warmup_iters": 2},
    }
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(job))
    out = tmp_path / "run"
    entries = out / "teacher_cache" / "entries.bin"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "distill", "train", str(spec_file), "--out", str(out), "--device", "cpu"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (entries.exists() and entries.stat().st_size >= 2 * _RECORD):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "last.pt").exists()  # killed in the first epoch, mid-fill
    done_before = entries.stat().st_size // _RECORD
    assert 2 <= done_before < 8

    resumed = Trainer(LocalJobSpec.model_validate(job), out, device="cpu", report_every_s=0)
    metrics = resumed.run()
    report = metrics["teacher_cache"]
    assert report["enabled"] and report["recovered_entries"] >= done_before and report["bytes"] > 0
    assert report["hit_rate"] > 0 and report["entries"] >= 8
    assert "teacher cache: on" in (out / "train.log").read_text()

    # The same job with the teacher live: the same losses, step by step, within fp16 rounding of the teacher.
    reference = tmp_path / "live"
    Trainer(
        LocalJobSpec.model_validate({**job, "distill": {**job["distill"], "teacher_cache": "off"}}),
        reference,
        device="cpu",
        report_every_s=0,
    ).run()
    got, want = _progress(out), _progress(reference)
    assert sorted(got) == sorted(want) == list(range(1, 17))
    for it in want:  # epoch 1 steps 1-8 differ by the fp16 teacher only; epoch 2 also by the drift of the weights
        for term, value in want[it].items():
            assert got[it][term] == pytest.approx(value, rel=2e-3 if it <= 8 else 2e-2, abs=1e-4), (it, term)

    # Every entry on disk, those written before the kill included, holds the live teacher's rows.
    cache = resumed.teacher_cache
    assert isinstance(cache, TeacherCache)
    plain = DetectionDataset(resumed.data, resumed.train_loader.dataset.image_ids, image_size=SIZE)
    position = {image_id: i for i, image_id in enumerate(plain.image_ids)}
    for image_id, flipped, h, w in list(cache.index):
        image, target = plain[position[image_id]]
        if flipped:
            image = image.flip(-1)
        padded = torch.zeros((1, 3, h, w))
        padded[0, :, : image.shape[1], : image.shape[2]] = image
        with torch.no_grad():
            out = resumed.criterion.teacher_forward(padded)
        locs, reg, cls = cache.read((image_id, flipped, h, w))
        _close(reg, cls, out, 0, torch.from_numpy(locs.astype("int64")))


@torch.no_grad()
def test_the_cache_leaves_the_room_checkpoints_need(data_dir, tmp_path):
    loader = _loader(data_dir, 2)
    classes = loader.dataset.data.classes
    student, teacher = _tiny(0, classes, 4), _tiny(1, classes, 2)
    live, cached = _criterion(student, teacher, DistillSpec()), _criterion(student, teacher, DistillSpec())
    cached.teacher_source = cache = TeacherCache(tmp_path / "cache", cached, min_free_bytes=2**62)
    set_epoch(loader, 0)
    images, targets = next(iter(loader))
    for _ in range(2):  # the misses stay live, nothing is written
        _same(cached(images, targets), live(images, targets))
    report = cache.report()
    assert report["entries"] == 0 and report["hit_rate"] == 0 and "No space left" in report["full"]
    assert (tmp_path / "cache" / "reg.f16").stat().st_size == 0

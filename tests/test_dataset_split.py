"""The split belongs to the data set, not to the job (issue 23, item 1).

- a data set whose images name no split is split once, at upload (``val_split``, ``split_seed``), stored with each
  image's content hash; jobs with seeds 0, 1 and 2 on it train and validate on the same images, and a job's
  ``val_split`` that differs from the data set's is refused;
- over real HTTP (a uvicorn API with torch blocked, a Celery worker, Redis): the upload's form fields and the data
  set's description; a distillation whose teacher was trained on some of its validation images (the same pictures
  uploaded as another data set with another split) is refused before queueing, naming the count and the teacher,
  and runs with ``distill.allow_teacher_overlap``, which its metrics record;
- a study's report says when its teacher saw the students' validation images.

The migration that gives existing data sets their split is tested in ``tests/test_migrations.py``; a study's
teacher AP against the teacher's own, in ``tests/test_studies.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from api.client import APIClientError, Client, zip_folder
from api.datasets import ZipLimits, import_dataset
from core import study_report
from core.checks import JobRefused, check_job, resolve_job, teacher_overlap
from core.settings import Settings
from core.store import Store
from distill.data.annotations import load_coco, split
from distill.data.dataset import build_loaders
from distill.spec import JobSpec, LocalJobSpec
from tests.api_server import serve_api
from tests.service_fixtures import WorkerProcess


def dataset_folder(root: Path, n: int, *, splits: bool = False) -> Path:
    """A COCO data set folder of ``n`` distinct 64x48 pictures (one box each); with ``splits`` its images name
    their split: the last ``test``, the one before ``val``, the rest ``train``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = Image.new("RGB", (64, 48), (90, 110, 100))
        x, y = 4 + 3 * i % 30, 5 + 2 * i % 20
        ImageDraw.Draw(img).rectangle((x, y, x + 20, y + 16), fill=(200, (40 * i) % 255, 30))
        img.save(root / "images" / f"img_{i}.png")
        image = {"id": i + 1, "file_name": f"images/img_{i}.png", "width": 64, "height": 48}
        if splits:
            image["split"] = "test" if i == n - 1 else "val" if i == n - 2 else "train"
        images.append(image)
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, 20, 16], "area": 320,
                     "iscrowd": 0})  # fmt: skip
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def _upload(tmp: Path, store: Store, settings: Settings, ds_id: str, val_split: float, split_seed: int) -> Path:
    """What POST /v1/datasets does, without HTTP: import the zip, publish its folder, record it with its split."""
    folder = dataset_folder(tmp / "src", 10)
    archive = zip_folder(folder, tmp / f"{ds_id}.zip")
    imported = import_dataset(archive, tmp / f"work_{ds_id}", ZipLimits(1 << 30), 10**8, val_split, split_seed)
    final = settings.datasets_dir / ds_id
    final.parent.mkdir(parents=True, exist_ok=True)
    imported.root.rename(final)
    store.add_dataset(ds_id, "d", f"datasets/{ds_id}", imported.classes, imported.num_images, imported.num_boxes,
                      imported.splits, imported.problems, val_split=imported.val_split,
                      split_seed=imported.split_seed, images=imported.images)  # fmt: skip
    return final


def test_jobs_with_seeds_0_1_2_use_the_data_sets_one_split(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    store = Store(settings.store_url)
    try:
        folder = _upload(tmp_path, store, settings, "ds_00000000000000d1", 0.3, 7)
        ds = store.get_dataset("ds_00000000000000d1")
        assert ds["split"] == {"source": "drawn", "val_split": 0.3, "split_seed": 7, "train": 7, "val": 3, "test": 0}
        data = load_coco(folder)
        # The draw depends on its seed: drawn with each job's seed, as before, the jobs would disagree.
        assert len({tuple(split(data, 0.3, seed)[1]) for seed in (0, 1, 2)}) > 1
        stored_val = [im["image_id"] for im in store.dataset_images(ds["id"]) if im["split"] == "val"]
        assert stored_val == split(data, 0.3, 7)[1]

        seen = []
        for seed in (0, 1, 2):
            local = LocalJobSpec.model_validate(
                resolve_job({"kind": "train", "dataset": ds["id"], "seed": seed}, store, settings)
            )
            assert (local.seed, local.val_split, local.split_seed) == (seed, 0.3, 7)
            train, val, _ = build_loaders(local.dataset, local.val_split, local.seed, (64, 48), 2, 0,
                                          split_seed=local.split_seed)  # fmt: skip
            seen.append((sorted(train.dataset.image_ids), val.dataset.image_ids))
        assert seen[0] == seen[1] == seen[2] and seen[0][1] == stored_val

        # The job's val_split (deprecated) may repeat the data set's, not change it.
        assert check_job(JobSpec(kind="train", dataset=ds["id"], val_split=0.3), store, settings).val_split == 0.3
        with pytest.raises(JobRefused) as refused:
            check_job(JobSpec(kind="train", dataset=ds["id"], val_split=0.5), store, settings)
        assert refused.value.code == "split_conflict" and refused.value.status == 422
        assert "val_split 0.3, split_seed 7" in refused.value.message

        # A teacher uploaded as a checkpoint: what it was trained on is unknown, so it cannot be refused.
        upload = JobSpec(kind="distill", dataset=ds["id"], teacher={"checkpoint": "ck_0000000000000000"})
        found = teacher_overlap(upload, ds, store)
        assert found is not None and found["seen"] is None and "uploaded checkpoint" in found["why"]
    finally:
        store.close()


def test_report_shows_a_teacher_that_saw_the_validation_images() -> None:
    overlap = {"teacher": "job job_t", "teacher_job": "job_t", "val_images": 5, "seen": 3, "allowed": True}
    members = [{"row": study_report.PLAIN_ROW, "method": None, "seed": 0, "job_id": "job_p", "state": "succeeded",
                "metrics": {"bbox": {"AP": 0.3, "AP50": 0.5, "AP75": 0.2}}, "model_id": "mdl_p", "error": None},
               {"row": "ld", "method": "ld", "seed": 0, "job_id": "job_l", "state": "succeeded", "model_id": "mdl_l",
                "metrics": {"bbox": {"AP": 0.4, "AP50": 0.6, "AP75": 0.3}, "teacher_bbox": {"AP": 0.5},
                            "teacher_overlap": overlap}, "error": None}]  # fmt: skip
    report = study_report.build("st_x", members)
    assert report["teacher_overlap"] == overlap and report["teacher_AP"] == 0.5
    md = study_report.markdown({"id": "st_x", "spec": {}}, report)
    assert "Teacher AP on the students' validation split: 50.0" in md
    assert "was trained on 3 of these 5 validation images" in md and "allow_teacher_overlap" in md
    clean = study_report.markdown({"id": "st_x", "spec": {}}, {**report, "teacher_overlap": {**overlap, "seen": 0}})
    assert "validation images**" not in clean


# ----------------------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("split")
    api = serve_api(tmp, LDD_LEASE_SECONDS="20", LDD_HEARTBEAT_SECONDS="1", LDD_PROGRESS_SECONDS="0.5")
    worker = WorkerProcess(api.env, tmp / "worker.log").start()
    try:
        yield api, worker, tmp
    finally:
        worker.kill_all()
        api.stop()


def test_teacher_that_saw_validation_images_refused_over_http_and_override_recorded(service: Any) -> None:
    api, worker, tmp = service
    c = Client(api.url, timeout=60)
    folder = dataset_folder(tmp / "photos", 8)
    # The same pictures, uploaded twice with other split seeds: a teacher trained on the second has seen some of
    # the first's validation images (matched by content, not by data set).
    first = c.upload_dataset(folder, name="first", val_split=0.25, split_seed=0)
    second = c.upload_dataset(folder, name="second", val_split=0.25, split_seed=3)
    assert first["split"] == {"source": "drawn", "val_split": 0.25, "split_seed": 0, "train": 6, "val": 2, "test": 0}
    assert c.get_dataset(second["id"])["split"]["split_seed"] == 3
    own = c.upload_dataset(dataset_folder(tmp / "own", 5, splits=True), val_split=0.5)  # its images' split wins
    assert own["split"] == {"source": "own", "val_split": None, "split_seed": None, "train": 3, "val": 1, "test": 1}
    data = load_coco(folder)
    saw = len(set(split(data, 0.25, 0)[1]) & set(split(data, 0.25, 3)[0]))
    assert saw > 0

    schedule = {"epochs": 1, "batch_size": 2, "image_size": [64, 48], "num_workers": 0, "warmup_iters": 1}
    teacher = c.submit_job({"kind": "train", "dataset": second["id"], "student": {"arch": "gfl_tiny"},
                            "schedule": schedule})  # fmt: skip
    done = c.wait(teacher["id"], timeout=300, poll=0.5)
    assert done["state"] == "succeeded", (done["error"], worker.log_tail())

    body = {"kind": "distill", "dataset": first["id"], "teacher": {"job": teacher["id"]},
            "student": {"arch": "gfl_tiny"}, "schedule": schedule}  # fmt: skip
    with pytest.raises(APIClientError) as refused:
        c.submit_job(body)
    assert refused.value.status == 422 and refused.value.code == "teacher_saw_validation"
    message = refused.value.message
    assert f"teacher job {teacher['id']} was trained on {saw} of this job's 2 validation images" in message
    assert [j["id"] for j in c.list_jobs()] == [teacher["id"]]  # nothing queued
    with pytest.raises(APIClientError) as conflict:  # nor may a job move the data set's split
        c.submit_job({**body, "val_split": 0.5, "distill": {"allow_teacher_overlap": True}})
    assert conflict.value.status == 422 and conflict.value.code == "split_conflict"

    allowed = c.submit_job({**body, "distill": {"allow_teacher_overlap": True}})
    ran = c.wait(allowed["id"], timeout=300, poll=0.5)
    assert ran["state"] == "succeeded", (ran["error"], worker.log_tail())
    recorded = ran["metrics"]["teacher_overlap"]
    assert recorded["seen"] == saw and recorded["allowed"] is True and recorded["val_images"] == 2
    assert recorded["teacher_job"] == teacher["id"]

"""Teachers across families through the real service path (issue 18): a ``python -m worker`` process claims
each distillation job, checks it, trains it in a ``python -m distill train`` child, exports and publishes
the student. One teacher of each family, including RetinaNet (9 anchors per location) -> FCOS (1) and
ATSS (1) -> RetinaNet (9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.service_fixtures import DATASET, IMAGE_SIZE, Service, train_spec

pytestmark = pytest.mark.timeout(900)

# (teacher family, student family): every family teaches once, both directions of the several/one-anchor rule.
PAIRS = [("retina", "fcos"), ("atss", "retina"), ("gfl", "gflv2"), ("gflv2", "atss"), ("fcos", "gfl")]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    from distill.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=4, image_size=IMAGE_SIZE,
                          num_classes=2, seed=0)  # fmt: skip


@pytest.mark.slow
def test_a_teacher_of_each_family_distils_through_the_worker(tmp_path, dataset_dir):
    from distill.checkpoint import atomic_save, build_detector, detector_state
    from distill.ckpt_layout import describe_checkpoint

    service = Service(tmp_path, "filesystem://", dataset_dir)
    try:
        jobs = {}
        for i, (teacher, student) in enumerate(PAIRS):
            ck = f"ck_000000000000000{i}"
            path = service.settings.checkpoints_dir / f"{ck}.pt"  # where the key checkpoints/<id>.pt points
            atomic_save(detector_state(build_detector(f"{teacher}_tiny", 2, ["0", "1"])), path)
            facts = describe_checkpoint(path)
            assert facts["family"] == teacher
            service.store.add_checkpoint(ck, f"checkpoints/{ck}.pt", facts, f"{teacher}_tiny teacher")
            spec = {**train_spec(DATASET, epochs=1), "kind": "distill", "name": f"{teacher}->{student}",
                    "student": {"arch": f"{student}_tiny"}, "teacher": {"checkpoint": ck}}  # fmt: skip
            jobs[(teacher, student)] = service.submit(spec)
        service.start_worker()
        for (teacher, student), job_id in jobs.items():
            job = service.wait_end(job_id, timeout=300)
            assert job["state"] == "succeeded", (teacher, student, job.get("error"), service.logs())
            run = service.settings.run_dir(job_id)
            metrics = json.loads((run / "metrics.json").read_text())
            assert 0 <= metrics["bbox"]["AP"] <= 1
            # The teacher's outputs were compared with the student's in the student's rows, before and after.
            after = metrics["diagnostics"]["after"]
            assert len(after["box_l1"]) == 5 and 0 < after["box_l1_mean"] <= 2
            reports = [p["losses"] for p in service.progress_lines(job_id) if p["phase"] == "train" and p["losses"]]
            assert {"main_ld", "vlr_ld", "main_kd"} <= set(reports[-1]), reports[-1]
            assert job["model_id"] is not None  # exported and published
    finally:
        service.close()

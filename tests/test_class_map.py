"""Teachers with other classes (DESIGN section 3): LD from any teacher with the same reg_max and strides, KD
only between mapped classes (by name ignoring case, or the job's distill.class_map), and what the job's
metrics say about it."""

import json
from pathlib import Path

import pytest
import torch

from distill.checkpoint import atomic_save, build_detector, detector_state
from distill.class_map import ClassMapError, map_classes
from distill.criterion import DistillCriterion
from distill.data.synthetic import make_synthetic
from distill.diagnostics import diagnostics
from distill.losses import sigmoid_kd_loss
from distill.models.gfl import GFL, DetectorConfig
from distill.outputs import GroundTruth, head_outputs
from distill.spec import DistillSpec, GFLWeights, LocalJobSpec
from distill.task_criteria import GFLCriterion
from distill.train import Trainer, TrainingError

GT = GroundTruth(
    torch.tensor([[[10.0, 12, 60, 70], [70, 20, 120, 90]], [[30, 8, 100, 60], [0, 0, 0, 0]]]),
    torch.tensor([[0, 0], [0, 0]]),
    torch.tensor([[True, True], [True, False]]),
)
DIGITS = [str(i) for i in range(10)]
KD_BOTH = DistillSpec.model_validate({"weights": {"vlr_kd": 1.0}})


def _tiny(seed: int, classes: list[str]) -> GFL:
    torch.manual_seed(seed)
    model = GFL(
        DetectorConfig(depth=18, base_width=16, channels=32, stacked_convs=2, num_classes=len(classes), classes=classes)
    )
    g = torch.Generator().manual_seed(seed + 100)  # class logits far from the flat initial prior
    with torch.no_grad():
        model.bbox_head.gfl_cls.weight.add_(torch.randn(model.bbox_head.gfl_cls.weight.shape, generator=g) * 0.3)
    return model


IMAGES = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))


def _terms(student: GFL, teacher: GFL, spec: DistillSpec = KD_BOTH, t_cls: torch.Tensor | None = None):
    """The criterion's losses, the student's and teacher's outputs and the regions, for the fixed batch."""
    criterion = DistillCriterion(
        GFLCriterion(student, GFLWeights()),
        teacher,
        spec,
        map_classes(student.classes, teacher.classes, spec.class_map),
    )
    with torch.no_grad():
        s_out = head_outputs(student, IMAGES, False)
        t_out = criterion.teacher_forward(IMAGES)
        if t_cls is not None:
            t_out.cls = t_cls
        losses = criterion.losses(s_out, t_out, GT)
        _, state = criterion.task.losses(s_out, GT)
        regions = criterion.regions(state, GT)
    return criterion, losses, s_out, t_out, regions


def _direct_kd(s_cls, t_cls, mask, weights, s_cols, t_cols, tau=2.0):
    """KD written out on the selected columns: the (weighted) mean over the region of the summed per-class
    Bernoulli KL between student column s_cols[i] and teacher column t_cols[i]."""
    per_location = sigmoid_kd_loss(s_cls[mask][:, s_cols], t_cls[mask][:, t_cols], tau)
    if weights is None:
        return per_location.mean()
    w = weights[mask]
    return (per_location * w).sum() / w.sum()


# ----------------------------------------------------------------------------------------------- the map


def test_map_by_name_ignores_case_and_lists_the_unmapped():
    m = map_classes(["cat", "Dog", "fox"], ["dog", "person", "CAT", "car"])
    assert (m.student, m.teacher, m.names, m.unmapped) == ((0, 1), (2, 0), {"cat": "CAT", "Dog": "dog"}, ("fox",))
    assert not m.identity and m.kd_possible
    assert m.report() == {"mapping": {"cat": "CAT", "Dog": "dog"}, "unmapped": ["fox"], "by": "name", "kd": "on"}
    assert map_classes(["a", "b"], ["a", "b"]).identity and not map_classes(["b", "a"], ["a", "b"]).identity
    assert map_classes(["3"], DIGITS).teacher == (3,)
    none = map_classes(["cat"], DIGITS)
    assert not none.kd_possible and none.report()["kd"] == "off (no class in common)"
    assert none.report()["unmapped"] == ["cat"]
    assert map_classes(["cat"], ["cat"]).report(kd_weighted=False)["kd"] == "off (weight 0)"


def test_explicit_map_replaces_names_and_unknown_names_are_refused():
    m = map_classes(["car", "truck", "person"], ["vehicle", "person"], {"truck": "vehicle", "car": "vehicle"})
    assert (m.student, m.teacher, m.unmapped, m.source) == ((0, 1), (0, 0), ("person",), "class_map")
    with pytest.raises(ClassMapError) as e:
        map_classes(["car", "truck"], ["vehicle"], {"bus": "vehicle", "car": "Vehicle"})
    assert "'bus' is not a dataset class" in str(e.value) and "'Vehicle' is not a teacher class" in str(e.value)
    assert "'car', 'truck'" in str(e.value) and "'vehicle'" in str(e.value)  # says what the names could be


# ----------------------------------------------------------------------------------------------- the terms


def test_ten_class_teacher_teaches_a_one_class_student_through_its_class():
    student, teacher = _tiny(0, ["3"]), _tiny(1, DIGITS)
    criterion, losses, s_out, t_out, r = _terms(student, teacher)
    assert set(losses) >= {"main_ld", "vlr_ld", "main_kd", "vlr_kd"}
    torch.testing.assert_close(losses["main_kd"], _direct_kd(s_out.cls, t_out.cls, r.main, None, [0], [3]))
    torch.testing.assert_close(losses["vlr_kd"], _direct_kd(s_out.cls, t_out.cls, r.vlr, r.vlr_weight, [0], [3]))
    # Only teacher column 3 teaches: changing the nine others changes nothing, changing it changes KD.
    others = t_out.cls.clone()
    others[..., [0, 1, 2, 4, 5, 6, 7, 8, 9]] += 5.0
    _, same, *_ = _terms(student, teacher, t_cls=others)
    assert same["main_kd"] == losses["main_kd"] and same["vlr_kd"] == losses["vlr_kd"]
    three = t_out.cls.clone()
    three[..., 3] += 5.0
    _, moved, *_ = _terms(student, teacher, t_cls=three)
    assert moved["main_kd"] != losses["main_kd"]
    assert moved["main_ld"] == losses["main_ld"]  # LD reads no class


def test_partly_overlapping_classes_distil_the_overlap_only():
    student, teacher = _tiny(0, ["cat", "Dog", "fox"]), _tiny(1, ["dog", "person", "CAT", "car"])
    criterion, losses, s_out, t_out, r = _terms(student, teacher)
    assert criterion.class_report()["unmapped"] == ["fox"]
    torch.testing.assert_close(losses["main_kd"], _direct_kd(s_out.cls, t_out.cls, r.main, None, [0, 1], [2, 0]))
    torch.testing.assert_close(losses["vlr_kd"], _direct_kd(s_out.cls, t_out.cls, r.vlr, r.vlr_weight, [0, 1], [2, 0]))
    # "fox" has no teacher class: its column takes no part (pairing it with any teacher column would).
    assert _direct_kd(s_out.cls, t_out.cls, r.main, None, [0, 1, 2], [2, 0, 3]) > losses["main_kd"]


def test_explicit_class_map_picks_the_columns():
    student, teacher = _tiny(0, ["0", "1", "2"]), _tiny(1, ["cat", "dog"])
    spec = DistillSpec.model_validate({"class_map": {"2": "cat"}})
    criterion, losses, s_out, t_out, r = _terms(student, teacher, spec)
    torch.testing.assert_close(losses["main_kd"], _direct_kd(s_out.cls, t_out.cls, r.main, None, [2], [0]))
    assert criterion.class_report() == {"mapping": {"2": "cat"}, "unmapped": ["0", "1"], "by": "class_map", "kd": "on"}


def test_no_class_in_common_switches_kd_off_and_keeps_ld():
    student, teacher = _tiny(0, ["cat"]), _tiny(1, DIGITS)
    criterion, losses, *_ = _terms(student, teacher)
    assert set(losses) == {"qfl", "giou", "dfl", "main_ld", "vlr_ld"} and losses["main_ld"] > 0
    assert criterion.class_report()["kd"] == "off (no class in common)"
    loader = [(IMAGES, [{"size": (96, 128)}, {"size": (96, 128)}])]
    d = diagnostics(student, teacher, loader, "cpu", criterion.classes)
    assert d["cls_l1"] is None and d["cls_l1_mean"] is None and d["box_l1_mean"] > 0
    partly = diagnostics(_tiny(0, ["cat", "3"]), teacher, loader, "cpu", map_classes(["cat", "3"], DIGITS))
    assert all(v > 0 for v in partly["cls_l1"])


# ----------------------------------------------------------------------------------------------- a job


def _job(tmp_path: Path, teacher_classes: list[str], class_map: dict | None = None) -> LocalJobSpec:
    data = make_synthetic(
        tmp_path / "data", num_train=2, num_val=2, image_size=(64, 64), seed=1, num_classes=3, max_objects=2
    )  # classes "0", "1", "2"
    teacher = tmp_path / "teacher.pt"
    atomic_save(detector_state(build_detector("gfl_tiny", len(teacher_classes), teacher_classes)), teacher)
    return LocalJobSpec.model_validate(
        {
            "kind": "distill",
            "dataset": str(data),
            "student": {"arch": "gfl_tiny"},
            "teacher": {"path": str(teacher)},
            "distill": {"class_map": class_map},
            "schedule": {"epochs": 1, "batch_size": 2, "image_size": [64, 64], "num_workers": 0, "warmup_iters": 0},
        }
    )


def test_job_with_a_teacher_of_other_classes_records_the_map(tmp_path):
    metrics = Trainer(_job(tmp_path, ["cat", "dog"]), tmp_path / "off").run()
    assert metrics["class_map"] == {
        "mapping": {},
        "unmapped": ["0", "1", "2"],
        "by": "name",
        "kd": "off (no class in common)",
    }
    assert metrics["teacher_bbox"] is None and metrics["diagnostics"]["after"]["cls_l1"] is None
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["class_map"] == metrics["class_map"]
    progress = [json.loads(line) for line in (tmp_path / "off" / "progress.jsonl").read_text().splitlines()]
    trained = [p["losses"] for p in progress if p["losses"] and "qfl" in p["losses"]]
    assert trained and all("main_ld" in p and "main_kd" not in p for p in trained)

    partly = Trainer(_job(tmp_path, ["2", "person", "1"]), tmp_path / "partly").run()
    assert partly["class_map"] == {"mapping": {"1": "1", "2": "2"}, "unmapped": ["0"], "by": "name", "kd": "on"}
    assert set(partly["teacher_bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}  # on the classes it knows


def test_job_with_a_bad_class_map_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="'7' is not a dataset class.*'horse' is not a teacher class"):
        Trainer(_job(tmp_path, ["cat", "dog"], {"7": "cat", "1": "horse"}), tmp_path / "bad")

"""Teachers across families (issue 18): the several-anchor / one-anchor rule (distill.anchor_match), the
teacher's outputs in the student's rows (distill.outputs.student_layout), the pairing rule
(distill.pairing) and distillation terms between families."""

import pytest
import torch

from distill.anchor_match import match_anchors
from distill.checkpoint import build_detector
from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.outputs import HeadOutputs, pad_targets, score_logits, student_layout
from distill.pairing import pair_problems
from distill.spec import DistillSpec, GFLWeights, JobSpec, arch_config
from distill.task_criteria import task_criterion
from distill.teacher import TeacherMismatch, check_teacher


def test_nine_to_one_takes_the_teachers_most_confident_anchor_per_location():
    # Two locations of nine anchors; the scores pick anchor 4 at location 0 and anchor 8 at location 1.
    score = torch.zeros(1, 18)
    score[0, 4], score[0, 9 + 8] = 0.9, 0.7
    score[0, 9 + 2] = 0.6
    rows = torch.arange(18.0).reshape(1, 18, 1, 1).expand(1, 18, 4, 3)
    (got,) = match_anchors(score, [rows], 9, 1)
    assert got.shape == (1, 2, 4, 3)
    assert got[0, :, 0, 0].tolist() == [4.0, 17.0]


def test_one_to_nine_repeats_the_single_anchor_and_equal_counts_pass_through():
    rows = torch.tensor([[[1.0, 2], [3, 4]]])  # (B 1, L 2, C 2)
    (got,) = match_anchors(rows.amax(-1), [rows], 1, 9)
    assert got.shape == (1, 18, 2)
    assert (got[0, :9] == torch.tensor([1.0, 2])).all() and (got[0, 9:] == torch.tensor([3.0, 4])).all()
    assert match_anchors(rows.amax(-1), [rows], 1, 1)[0] is rows
    with pytest.raises(ValueError, match="no rule"):
        match_anchors(torch.zeros(1, 8), [torch.zeros(1, 8)], 4, 2)


def test_student_layout_folds_quality_and_picks_by_the_joint_score():
    # One location, nine teacher anchors; anchor 3 has the best class logit, but its quality is tiny, so the
    # joint score (what the teacher ranks by) prefers anchor 5.
    cls = torch.zeros(1, 9, 2)
    cls[0, 3, 0], cls[0, 5, 1] = 4.0, 3.0
    quality = torch.zeros(1, 9)
    quality[0, 3] = -8.0
    reg = torch.arange(9.0).reshape(1, 9, 1, 1).expand(1, 9, 4, 17).clone()
    out = student_layout(HeadOutputs(cls, reg, ((1, 1),), quality=quality), 9, 1)
    assert out.quality is None and out.cls.shape == (1, 1, 2) and out.reg[0, 0, 0, 0].item() == 5.0
    torch.testing.assert_close(out.cls.sigmoid(), (cls[:, 5:6].sigmoid() * quality[:, 5:6, None].sigmoid()))
    same = HeadOutputs(cls[:, :1], reg[:, :1], ((1, 1),))
    assert student_layout(same, 1, 1) is same


def _batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 96)
    targets = [
        {"boxes": torch.tensor([[8.0, 8, 50, 56], [52, 10, 90, 60]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[20.0, 16, 70, 60]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def _criterion(student_arch: str, teacher_arch: str, **weights: float) -> DistillCriterion:
    student, teacher = build_detector(student_arch, 2), build_detector(teacher_arch, 2)
    spec = DistillSpec(weights=weights or {})
    return DistillCriterion(task_criterion(student, GFLWeights()), teacher, spec, map_classes(["0", "1"], ["0", "1"]))


@pytest.mark.parametrize(("student", "teacher"), [("fcos_tiny", "retina_tiny"), ("retina_tiny", "atss_tiny")])
def test_ld_across_anchor_counts_reads_the_matched_teacher_rows(student, teacher):
    criterion = _criterion(student, teacher, main_ld=1.0, vlr_ld=1.0, main_kd=1.0)
    images, targets = _batch()
    s_out = criterion.task.forward(images)
    t_raw = criterion.teacher_forward(images)
    a_s, a_t = criterion.student_anchors, criterion.teacher_anchors
    assert t_raw.cls.shape[1] // a_t == s_out.cls.shape[1] // a_s  # the same locations
    gt = pad_targets(targets, "cpu")
    losses = criterion.losses(s_out, t_raw, gt)
    assert {"main_ld", "vlr_ld", "main_kd"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    # A student whose edge logits are the matched teacher's own has no Main or VLR LD left to learn.
    matched = criterion.to_student(t_raw)
    copy = HeadOutputs(s_out.cls, matched.reg.clone(), s_out.sizes, quality=s_out.quality)
    zero = criterion.losses(copy, t_raw, gt)
    assert zero["main_ld"].abs().item() < 1e-5 and zero["vlr_ld"].abs().item() < 1e-5
    # ... and the matched rows are the teacher's (9 -> 1: its best anchor; 1 -> 9: repeated).
    if a_t == 9:
        best = score_logits(t_raw).sigmoid().amax(-1).reshape(2, -1, 9).argmax(-1)
        rows = t_raw.reg.reshape(2, -1, 9, 4, 17).gather(2, best[..., None, None, None].expand(-1, -1, 1, 4, 17))
        torch.testing.assert_close(matched.reg, rows[:, :, 0])
    else:
        torch.testing.assert_close(matched.reg, t_raw.reg.repeat_interleave(9, 1))


def test_crosskd_and_bckd_across_families_backpropagate_to_the_student():
    criterion = _criterion("fcos_tiny", "retina_tiny", crosskd_cls=1.0, crosskd_reg=1.0, bckd_cls=1.0, bckd_loc=1.0)
    images, targets = _batch()
    losses = criterion(images, targets)
    assert {"crosskd_cls", "crosskd_reg", "bckd_cls", "bckd_loc"} <= set(losses)
    sum(losses.values()).backward()
    student, teacher = criterion.task.model, criterion.teacher
    assert student.bbox_head.cls_convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_hard_edge_teacher_is_distilled_at_tau_one():
    criterion = _criterion("gfl_tiny", "atss_tiny")
    assert criterion.ld_tau == 10.0
    teacher = build_detector("atss_tiny", 2)
    teacher.hard_edge_targets = True
    spec = DistillSpec()
    hard = DistillCriterion(task_criterion(build_detector("gfl_tiny", 2), GFLWeights()), teacher, spec,
                            map_classes(["0", "1"], ["0", "1"]))  # fmt: skip
    assert hard.ld_tau == 1.0


def test_pairing_rule_names_every_problem():
    gfl, retina = arch_config("gfl_tiny"), arch_config("retina_tiny")
    assert pair_problems({**retina, "num_anchors": 9}, {**gfl, "num_anchors": 1}) == []
    problems = pair_problems({**gfl, "reg_max": 8, "strides": [8, 16, 32]}, gfl)
    assert len(problems) == 2 and "reg_max 8 differs from the student's 16" in problems[0]
    assert "strides [8, 16, 32] differ" in problems[1]
    assert "anchors per location" in pair_problems({"num_anchors": 9}, {"num_anchors": 4})[0]
    weight = DistillSpec(method="crosskd").weights.value
    standard = {**retina, "num_anchors": 9, "form": "standard", "family": "retina"}
    assert "CrossKD" in pair_problems(standard, gfl, weight)[0]
    assert pair_problems(standard, gfl, DistillSpec().weights.value) == []


def test_check_teacher_refuses_a_method_the_pair_cannot_run():
    student, teacher = build_detector("fcos_tiny", 2), build_detector("retina_tiny", 2)
    check_teacher(teacher, student, DistillSpec(method="crosskd"))  # a distribution head: CrossKD runs
    teacher.hard_edge_targets = True
    check_teacher(teacher, student, DistillSpec())
    with pytest.raises(TeacherMismatch, match="CrossKD"):
        check_teacher(teacher, student, DistillSpec(method="crosskd"))


def test_job_check_takes_any_family_pair_and_refuses_what_the_pair_cannot_run(tmp_path):
    """The job check (before queueing) asks the same rule: a RetinaNet teacher (9 anchors) for an FCOS
    student and back are accepted, CrossKD from a standard-form teacher is refused with the reason."""
    from core.checks import JobRefused, check_job
    from core.settings import Settings
    from core.store import Store

    settings = Settings(data_dir=tmp_path / "ldd", weights_dir=tmp_path / "weights")
    settings.make_dirs()
    store = Store(settings.store_url)
    ds = settings.datasets_dir / "ds_00000000000000d1"
    ds.mkdir()
    store.add_dataset(
        "ds_00000000000000d1", "d", "datasets/ds_00000000000000d1", ["0", "1"], 3, 4, {"train": 2, "val": 1}, []
    )
    facts = {"kind": "detector", "depth": 18, "base_width": 16, "channels": 32, "stacked_convs": 2, "reg_max": 16,
             "strides": [8, 16, 32, 64, 128], "num_classes": 2, "classes": ["0", "1"]}  # fmt: skip
    for i, extra in enumerate(
        [
            {"family": "retina", "num_anchors": 9},
            {"family": "atss", "num_anchors": 1},
            {"family": "retina", "num_anchors": 9, "form": "standard", "reg_max": None},
        ]  # fmt: skip
    ):
        path = settings.checkpoints_dir / f"ck_000000000000000{i}.pt"
        path.write_bytes(b"weights")
        store.add_checkpoint(f"ck_000000000000000{i}", f"checkpoints/{path.name}", {**facts, **extra}, "t")

    def job(student: str, teacher: int, method: str = "ld"):
        return JobSpec.model_validate(
            {"kind": "distill", "dataset": "ds_00000000000000d1", "student": {"arch": student},
             "teacher": {"checkpoint": f"ck_000000000000000{teacher}"}, "distill": {"method": method}}
        )  # fmt: skip

    try:
        assert check_job(job("fcos_tiny", 0), store, settings).teacher_facts["num_anchors"] == 9
        assert check_job(job("retina_tiny", 1, "crosskd"), store, settings).teacher_facts["family"] == "atss"
        check_job(job("fcos_tiny", 2), store, settings)  # LD from a standard-form teacher: DFL towards its box
        with pytest.raises(JobRefused, match="CrossKD runs the student's head features") as e:
            check_job(job("fcos_tiny", 2, "crosskd"), store, settings)
        assert e.value.code == "teacher_mismatch"
    finally:
        store.close()

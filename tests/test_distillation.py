"""Distillation terms on real tiny-model outputs, the teacher check, the job fields, the diagnostics, and a
distillation run through the training loop."""

import copy
import json

import pytest
import torch
from pydantic import ValidationError

import distill.criterion
from distill.checkpoint import atomic_save, detector_state
from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.data.synthetic import make_synthetic
from distill.diagnostics import diagnostics
from distill.losses import ld_loss
from distill.losses.gfl import giou_loss
from distill.losses.imitation import build_adapters, imitation_weights
from distill.models.gfl import GFL, DetectorConfig
from distill.outputs import GroundTruth, HeadOutputs, head_outputs
from distill.regions import find_regions
from distill.spec import DistillSpec, GFLWeights, LocalJobSpec
from distill.task_criteria import GFLCriterion
from distill.teacher import TeacherMismatch, check_teacher
from distill.train import Trainer

GT_BOXES = torch.tensor([[[10.0, 12, 60, 70], [70, 20, 120, 90]], [[30, 8, 100, 60], [0, 0, 0, 0]]])
GT_LABELS = torch.tensor([[1, 2], [0, 0]])
GT_VALID = torch.tensor([[True, True], [True, False]])


def _tiny(seed: int, **cfg) -> GFL:
    torch.manual_seed(seed)
    return GFL(DetectorConfig(depth=18, base_width=16, channels=32, stacked_convs=2, num_classes=3, **cfg))


def _perturb(model: GFL, seed: int) -> GFL:
    """Random head weights big enough that the outputs are far from uniform (an untrained head is ~flat)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (model.bbox_head.gfl_reg, model.bbox_head.gfl_cls):
            conv.weight.add_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    return model


def _outputs(model: GFL, images: torch.Tensor, feats: bool = False) -> HeadOutputs:
    return head_outputs(model, images, amp=False, keep_feats=feats)


def _gt(b: int = 2) -> GroundTruth:
    n = b // 2
    return GroundTruth(GT_BOXES.repeat(n, 1, 1), GT_LABELS.repeat(n, 1), GT_VALID.repeat(n, 1))


def _criterion(student: GFL, teacher: GFL, spec: DistillSpec) -> DistillCriterion:
    return DistillCriterion(
        GFLCriterion(student, GFLWeights()),
        teacher,
        spec,
        map_classes(student.classes, teacher.classes, spec.class_map),
    )


def _distill_terms(
    student: GFL, teacher: GFL, spec: DistillSpec, s_out: HeadOutputs, t_out: HeadOutputs, gt: GroundTruth | None = None
) -> dict[str, torch.Tensor]:
    """The distillation terms only (the criterion's losses without GFL's own)."""
    losses = _criterion(student, teacher, spec).losses(s_out, t_out, gt or _gt())
    return {k: v for k, v in losses.items() if k not in ("qfl", "giou", "dfl")}


@pytest.fixture(scope="module")
def pair():
    student, teacher = _tiny(0), _perturb(_tiny(1), 2).eval()
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    return student, teacher, images


def _spec(**kw) -> DistillSpec:
    return DistillSpec.model_validate(kw)


# ----------------------------------------------------------------------------------------------- job fields


def test_defaults_are_the_papers_best_row():
    d = DistillSpec()
    assert (d.method, d.tau, d.gamma) == ("ld", 10.0, 0.25)
    assert d.weights.main_kd > 0 and d.weights.main_ld > 0 and d.weights.vlr_ld > 0 and d.weights.vlr_kd == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"tau": 0},
        {"tau": -1},
        {"gamma": 1.5},
        {"gamma": -0.1},
        {"kd_tau": 0},
        {"weights": {"main_ld": -1}},
        {"weights": {"vlr_kd": -0.5}},
        {"method": "feat"},
        {"weights": {"ld": 1}},
        {"tbr_margin": -1},
    ],
)
def test_out_of_range_fields_are_refused(bad):
    with pytest.raises(ValidationError):
        DistillSpec.model_validate(bad)


# ----------------------------------------------------------------------------------------------- teacher check


def test_check_teacher_names_every_mismatch():
    student = _tiny(0)
    check_teacher(_tiny(1), student)  # same family and layout: fine
    check_teacher(GFL(DetectorConfig(depth=18, base_width=32, channels=64, num_classes=3)), student)  # bigger: fine
    # Other classes are fine too: LD needs none, KD maps them (tests/test_class_map.py).
    check_teacher(GFL(DetectorConfig(depth=18, base_width=16, channels=32, stacked_convs=2, num_classes=80)), student)
    check_teacher(_tiny(1, classes=["dog", "cat", "fox"]), _tiny(0, classes=["cat", "dog", "fox"]))
    with pytest.raises(TeacherMismatch, match="reg_max 8 differs from the student's 16"):
        check_teacher(_tiny(1, reg_max=8), student)
    with pytest.raises(TeacherMismatch, match="strides .* differ from the student's"):
        check_teacher(_tiny(1, strides=(8, 16, 32, 64)), student)
    with pytest.raises(TeacherMismatch, match="reg_max.*; strides"):
        check_teacher(_tiny(1, reg_max=8, strides=(8, 16, 32, 64)), student)


# ----------------------------------------------------------------------------------------------- losses


def test_default_terms_zero_weights_skip_and_gradient_only_to_the_student(pair, monkeypatch):
    student, teacher, images = pair
    s_out = _outputs(student, images)
    with torch.no_grad():
        t_out = _outputs(teacher, images)
    t_out.cls.requires_grad_()  # even a teacher output that tracks gradients gets none
    losses = _distill_terms(student, teacher, DistillSpec(), s_out, t_out)
    assert list(losses) == ["main_ld", "main_kd", "vlr_ld"]
    assert all(v.ndim == 0 and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert t_out.cls.grad is None
    assert student.bbox_head.gfl_reg.weight.grad.abs().sum() > 0

    assert (
        _distill_terms(student, teacher, _spec(weights={"main_ld": 0, "vlr_ld": 0, "main_kd": 0}), s_out, t_out) == {}
    )
    all_four = _distill_terms(student, teacher, _spec(weights={"vlr_kd": 0.5}), s_out, t_out)
    assert set(all_four) == {"main_ld", "vlr_ld", "main_kd", "vlr_kd"}
    torch.testing.assert_close(all_four["main_ld"], losses["main_ld"])

    # Weight 0 skips the work: with every VLR term off, the regions are never looked for.
    def no_regions(*args, **kwargs):
        raise AssertionError("regions computed although no VLR term is weighted")

    monkeypatch.setattr(distill.criterion, "find_regions", no_regions)
    only_main = _distill_terms(student, teacher, _spec(weights={"vlr_ld": 0}), s_out, t_out)
    assert set(only_main) == {"main_ld", "main_kd"}
    with pytest.raises(AssertionError, match="regions computed"):
        _distill_terms(student, teacher, DistillSpec(), s_out, t_out)


def test_terms_vanish_when_the_student_matches_the_teacher(pair):
    student, teacher, images = pair
    s_out = _outputs(student, images)
    twin = HeadOutputs(s_out.cls.detach().clone(), s_out.reg.detach().clone(), s_out.sizes)
    for spec in (_spec(weights={"vlr_kd": 1}), _spec(method="tbr")):
        terms = _distill_terms(student, teacher, spec, s_out, twin)
        assert len(terms) >= 2
        for name, value in terms.items():
            assert value.item() == pytest.approx(0, abs=1e-6), name


def test_vlr_ld_is_the_iou_weighted_mean_over_the_regions_edges(pair):
    student, teacher, images = pair
    with torch.no_grad():
        s_out = _outputs(student, images)
        t_out = _outputs(teacher, images)
    criterion = _criterion(student, teacher, _spec(weights={"main_ld": 0, "main_kd": 0, "vlr_ld": 2.0}))
    got = criterion.losses(s_out, t_out, _gt())
    _, state = criterion.task.losses(s_out, _gt())
    a = state.assignment
    r = find_regions(state.locations.anchors, GT_BOXES, GT_VALID, a.positive, a.threshold, 0.25)
    assert r.vlr.sum() > 10
    per_edge = ld_loss(s_out.reg[r.vlr].reshape(-1, 17), t_out.reg[r.vlr].reshape(-1, 17), 10.0).reshape(-1, 4)
    w = r.vlr_weight[r.vlr]
    torch.testing.assert_close(got["vlr_ld"], 2.0 * (per_edge.mean(1) * w).sum() / w.sum())


def test_terms_do_not_change_with_batch_size(pair):
    """The same images twice in one batch: twice the positives, VLR and objects; the same loss values."""
    student, teacher, images = pair
    spec = _spec(weights={"vlr_kd": 1.0})
    with torch.no_grad():
        values = []
        for b in (2, 4):
            batch = images.repeat(b // 2, 1, 1, 1)
            values.append(
                _distill_terms(student, teacher, spec, _outputs(student, batch), _outputs(teacher, batch), _gt(b))
            )
    for name in values[0]:
        torch.testing.assert_close(values[1][name], values[0][name], rtol=1e-4, atol=1e-6)


def test_tbr_bounded_by_the_teachers_error(pair):
    student, teacher, images = pair
    s_out = _outputs(student, images)
    with torch.no_grad():
        t_out = _outputs(teacher, images)
    # With a huge margin every positive is active: the mean GIoU loss between student and teacher boxes.
    always = _distill_terms(student, teacher, _spec(method="tbr", tbr_margin=1e6, weights={"main_kd": 0}), s_out, t_out)
    assert set(always) == {"tbr"} and always["tbr"] > 0
    _, state = GFLCriterion(student, GFLWeights()).losses(s_out, _gt())
    pos = state.positives
    centre = pos.centre
    t_box = torch.cat(
        [
            centre - student.bbox_head.integral(t_out.reg[pos.b, pos.a])[:, :2],
            centre + student.bbox_head.integral(t_out.reg[pos.b, pos.a])[:, 2:],
        ],
        1,
    )
    torch.testing.assert_close(always["tbr"], giou_loss(pos.pred, t_box).mean())
    # ... and one whose boxes are worse than any student box never teaches.
    far = t_out.reg.clone()
    far[pos.b, pos.a] = torch.full((len(pos.b), 4, 17), -1e4).index_fill_(2, torch.tensor([16]), 0.0)
    never = _distill_terms(student, teacher, _spec(method="tbr"), s_out, HeadOutputs(t_out.cls, far, t_out.sizes))
    student_err = (pos.pred - pos.target).pow(2).sum(1)
    far_box = torch.cat([centre - 16, centre + 16], 1)
    far_err = (far_box - pos.target).pow(2).sum(1)
    assert (student_err < far_err).all()
    assert never["tbr"].item() == 0


def test_fitnets_adapters_and_loss(pair):
    student, _, images = pair
    teacher = GFL(DetectorConfig(depth=18, base_width=16, channels=48, stacked_convs=2, num_classes=3)).eval()
    spec = _spec(method="fitnets", weights={"main_kd": 0})
    assert imitation_weights(spec.weights.value) == {"fitnets": 1.0} and not imitation_weights(
        DistillSpec().weights.value
    )
    assert build_adapters(32, 32, 5) is None
    adapters = build_adapters(32, 48, 5)
    assert len(adapters) == 5 and adapters[0].weight.shape == (48, 32, 1, 1)
    criterion = _criterion(student, teacher, spec)
    assert (
        criterion.keep_feats and list(criterion.adapters) == ["imitation"] and len(criterion.adapters["imitation"]) == 5
    )
    criterion.adapters["imitation"].load_state_dict(adapters.state_dict())
    s_out = _outputs(student, images, feats=True)
    t_out = criterion.teacher_forward(images)
    assert t_out.feats is not None and not t_out.feats[0].requires_grad
    losses = criterion.losses(s_out, t_out, _gt())
    assert set(losses) == {"qfl", "giou", "dfl", "fitnets"} and losses["fitnets"] > 0
    losses["fitnets"].backward()
    assert criterion.adapters["imitation"][0].weight.grad.abs().sum() > 0
    assert student.neck.fpn_convs[0].conv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------- diagnostics


def _loader(images: torch.Tensor):
    return [(images, [{"size": (96, 128)}, {"size": (64, 128)}])]


def test_diagnostics_per_level(pair):
    student, teacher, images = pair
    student.train()
    same = diagnostics(student, copy.deepcopy(student), _loader(images), "cpu")
    assert same["strides"] == [8, 16, 32, 64, 128] and same["images"] == 2
    assert same["cls_l1"] == [0.0] * 5 and same["box_l1"] == [0.0] * 5
    assert student.training  # mode restored
    diff = diagnostics(student, teacher, _loader(images), "cpu")
    assert all(v > 0 for v in diff["cls_l1"] + diff["box_l1"]) and 0 < diff["box_l1_mean"] <= 2
    json.dumps(diff)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_distillation_run_reduces_ld_and_leaves_the_teacher_untouched(tmp_path):
    data = make_synthetic(tmp_path / "data", num_train=8, num_val=4, image_size=(128, 96), seed=5, max_objects=3)
    sched = {"epochs": 6, "batch_size": 4, "image_size": [128, 96], "warmup_iters": 4, "num_workers": 0, "lr": 0.02}
    teacher_spec = LocalJobSpec.model_validate(
        {
            "kind": "train",
            "dataset": str(data),
            "student": {"arch": "gfl_tiny"},
            "schedule": {**sched, "epochs": 15},
            "seed": 9,
        }
    )
    teacher_trainer = Trainer(teacher_spec, tmp_path / "teacher")
    teacher_trainer.train()
    teacher_path = tmp_path / "teacher.pt"
    atomic_save(detector_state(teacher_trainer.model, {}), teacher_path)

    spec = LocalJobSpec.model_validate(
        {
            "kind": "distill",
            "dataset": str(data),
            "student": {"arch": "gfl_tiny"},
            "teacher": {"path": str(teacher_path)},
            "schedule": sched,
            "seed": 1,
        }
    )
    trainer = Trainer(spec, tmp_path / "student", report_every_s=0)
    before_state = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    teacher_ids = {id(p) for p in trainer.teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in trainer.optimizer.param_groups for p in g["params"])

    images, targets = next(iter(trainer.val_loader))

    def ld_on_fixed_batch() -> float:
        trainer.model.train()
        with torch.no_grad():
            return float(trainer.step(images, targets).losses["main_ld"])

    ld_before = ld_on_fixed_batch()
    metrics = trainer.run()
    ld_after = ld_on_fixed_batch()
    assert ld_after < 0.7 * ld_before, (ld_before, ld_after)
    after_state = trainer.teacher.state_dict()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert not trainer.teacher.training
    assert set(metrics["diagnostics"]) == {"before", "after", "figure5"}
    assert metrics["diagnostics"]["after"]["box_l1_mean"] < metrics["diagnostics"]["before"]["box_l1_mean"]
    # Figure 5 on the same image before and after: distillation brought the box logits closer at P5.
    fig5 = metrics["diagnostics"]["figure5"]
    assert fig5["before"]["image_id"] == fig5["after"]["image_id"] and "figure5" not in metrics["diagnostics"]["before"]
    p5_before, p5_after = (sum(map(sum, fig5[k]["maps"][0])) for k in ("before", "after"))
    assert p5_after < p5_before, (p5_before, p5_after)
    progress = [json.loads(line) for line in (tmp_path / "student" / "progress.jsonl").read_text().splitlines()]
    assert any({"main_ld", "vlr_ld", "main_kd"} <= set(p["losses"]) for p in progress)

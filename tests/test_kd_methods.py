"""CrossKD and BCKD (DESIGN section 3): each term on hand-made tensors and on tiny real models, the gradient
path through the frozen teacher, the adapters, scale invariance, a run through the training loop that leaves
the teacher's weights bit-identical, and the job check of the CrossKD layer."""

from __future__ import annotations

import copy

import pytest
import torch

from distill.boxes import distance_to_box
from distill.checkpoint import atomic_save, build_detector, detector_state
from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.data.synthetic import make_synthetic
from distill.losses.bckd import bckd_cls_loss, bckd_loc_loss, binary_kd, class_gap
from distill.losses.crosskd import align_stats, crosskd_cls_loss, crosskd_reg_loss
from distill.losses.gfl import giou_loss
from distill.models.gfl import GFL, DetectorConfig, Integral
from distill.outputs import GroundTruth, head_outputs
from distill.spec import DistillSpec, GFLWeights, LocalJobSpec
from distill.task_criteria import GFLCriterion
from distill.train import Trainer

ALL_TERMS = {"crosskd_cls": 1.0, "crosskd_reg": 1.0, "bckd_cls": 1.0, "bckd_loc": 1.0}
KD_KEYS = set(ALL_TERMS)


def _model(seed: int, channels: int = 32, stacked: int = 2, classes: int = 3) -> GFL:
    torch.manual_seed(seed)
    model = GFL(DetectorConfig(depth=18, base_width=16, channels=channels, stacked_convs=stacked, num_classes=classes))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # an untrained head is nearly flat: give its outputs some shape
        for conv in (model.bbox_head.gfl_reg, model.bbox_head.gfl_cls):
            conv.weight.add_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    return model


def _criterion(student: GFL, teacher: GFL, **distill) -> DistillCriterion:
    spec = DistillSpec.model_validate({"weights": {"main_ld": 0, "vlr_ld": 0, "main_kd": 0, **ALL_TERMS}, **distill})
    return DistillCriterion(
        GFLCriterion(student, GFLWeights()),
        teacher,
        spec,
        map_classes(student.classes, teacher.classes, spec.class_map),
    )


def _gt(batch: int) -> GroundTruth:
    boxes = torch.tensor([[10.0, 12, 60, 70], [70, 20, 120, 90]]).repeat(batch, 1, 1)
    sizes = torch.tensor([[96.0, 128.0]]).repeat(batch, 1)
    return GroundTruth(boxes, torch.tensor([[1, 2]]).repeat(batch, 1), torch.ones(batch, 2, dtype=torch.bool), sizes)


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 96, 128, generator=torch.Generator().manual_seed(7))


def _terms(criterion: DistillCriterion, images: torch.Tensor) -> dict[str, torch.Tensor]:
    student = head_outputs(criterion.task.model, images, False, tower_layer=criterion.crosskd_layer)
    teacher = criterion.teacher_forward(images)
    losses = criterion.losses(student, teacher, _gt(images.shape[0]))
    return {k: v for k, v in losses.items() if k in KD_KEYS}


# ----------------------------------------------------------------------------------------------- hand-made


def test_each_term_is_zero_when_the_student_answers_as_the_teacher():
    g = torch.Generator().manual_seed(0)
    cls, reg = torch.randn(2, 30, 3, generator=g) * 3, torch.randn(2, 30, 4, 17, generator=g) * 3
    valid = torch.ones(2, 30, dtype=torch.bool)
    centres = torch.rand(30, 2, generator=g) * 10
    assert binary_kd(cls.reshape(-1, 3), cls.reshape(-1, 3)).abs().max() == 0
    assert bckd_cls_loss(cls, cls.clone(), valid, 1.0) == 0
    assert bckd_loc_loss(reg, reg.clone(), cls, cls.clone(), centres, valid, Integral(16)) == 0
    assert crosskd_cls_loss(cls, cls.clone(), valid, 1.0) == 0
    assert crosskd_reg_loss(reg, reg.clone(), cls, valid, 10.0).abs() < 1e-6
    # ... and above 0 otherwise.
    other_cls, other_reg = cls + torch.randn(cls.shape, generator=g), reg + torch.randn(reg.shape, generator=g)
    assert bckd_cls_loss(other_cls, cls, valid, 1.0) > 0 and crosskd_cls_loss(other_cls, cls, valid, 1.0) > 0
    assert bckd_loc_loss(other_reg, reg, other_cls, cls, centres, valid, Integral(16)) > 0
    assert crosskd_reg_loss(other_reg, reg, cls, valid, 10.0) > 0


def test_bckd_box_weight_is_the_largest_class_gap():
    # Two locations, both with a box unlike the teacher's; class gaps (0.1, 0.4) and (0.2, 0.0).
    t_p = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    s_p = torch.tensor([[[0.6, 0.1], [0.3, 0.5]]])
    logit = torch.logit
    assert torch.allclose(class_gap(logit(s_p[0]), logit(t_p[0])), torch.tensor([0.4, 0.2]), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    s_reg, t_reg = torch.randn(1, 2, 4, 17, generator=g) * 3, torch.randn(1, 2, 4, 17, generator=g) * 3
    centres = torch.tensor([[5.0, 5.0], [9.0, 4.0]])
    integral = Integral(16)
    giou = giou_loss(distance_to_box(centres, integral(s_reg[0])), distance_to_box(centres, integral(t_reg[0])))
    expected = (0.4 * giou[0] + 0.2 * giou[1]) / 0.6
    got = bckd_loc_loss(s_reg, t_reg, logit(s_p), logit(t_p), centres, torch.ones(1, 2, dtype=torch.bool), integral)
    assert torch.allclose(got, expected, atol=1e-5)
    # Padded locations do not count.
    only_first = bckd_loc_loss(s_reg, t_reg, logit(s_p), logit(t_p), centres, torch.tensor([[True, False]]), integral)
    assert torch.allclose(only_first, giou[0], atol=1e-5)


def test_alignment_takes_the_teachers_channel_statistics():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 5, 6, generator=g) * 3 + 1
    t = torch.randn(2, 4, 5, 6, generator=g) * torch.tensor([0.5, 1, 2, 4])[None, :, None, None] - 2
    aligned = align_stats(s, t)
    assert torch.allclose(aligned.mean((0, 2, 3)), t.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(aligned.std((0, 2, 3), unbiased=False), t.std((0, 2, 3), unbiased=False), atol=1e-4)
    assert torch.allclose(align_stats(t, t), t, atol=1e-5)  # identity when the statistics already agree


# ----------------------------------------------------------------------------------------------- tiny models


def test_terms_vanish_when_the_student_is_the_teacher():
    teacher = _model(1, channels=32, stacked=3).eval()
    student = copy.deepcopy(teacher).eval()
    for p in student.parameters():
        p.requires_grad_(True)
    criterion = _criterion(student, teacher, crosskd_layer=1)
    assert criterion.adapters is None  # same width: no adapter
    terms = _terms(criterion, _images())
    assert set(terms) == KD_KEYS
    # The student's tower features equal the teacher's, so the alignment is the identity up to its eps.
    assert all(v.abs() < 1e-4 for v in terms.values()), terms


def test_crosskd_gradient_reaches_the_student_through_the_frozen_teacher():
    student, teacher = _model(0, channels=32, stacked=2), _model(1, channels=48, stacked=3).eval()
    criterion = _criterion(
        student, teacher, weights={"main_ld": 0, "vlr_ld": 0, "main_kd": 0, "crosskd_cls": 1, "crosskd_reg": 1}
    )
    assert criterion.crosskd_layer == 1  # default: one before the last layer both heads have
    assert set(criterion.adapters) == {"crosskd"}  # 32 -> 48 channels
    terms = _terms(criterion, _images())
    assert set(terms) == {"crosskd_cls", "crosskd_reg"} and all(v > 0 for v in terms.values())
    sum(terms.values()).backward()
    head = student.bbox_head
    # Layer 1 of each student tower feeds the teacher; its later layers and predictors are not on the path.
    assert head.cls_convs[0].conv.weight.grad.abs().sum() > 0
    assert head.reg_convs[0].conv.weight.grad.abs().sum() > 0
    assert student.neck.fpn_convs[0].conv.weight.grad.abs().sum() > 0
    assert head.cls_convs[1].conv.weight.grad is None and head.gfl_cls.weight.grad is None
    assert criterion.adapters["crosskd"].cls.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_crosskd_layer_bounds_and_adapter_only_when_widths_differ():
    student, teacher = _model(0, channels=32, stacked=2), _model(1, channels=32, stacked=4).eval()
    assert _criterion(student, teacher, crosskd_layer=2).adapters is None
    assert _criterion(student, teacher, crosskd_layer=0).crosskd_layer == 0
    with pytest.raises(ValueError, match="crosskd_layer 3"):
        _criterion(student, teacher, crosskd_layer=3)  # the student's tower has 2 layers
    off = _criterion(student, teacher, weights={"crosskd_cls": 0, "crosskd_reg": 0})
    assert off.crosskd_layer is None and off.adapters is None  # CrossKD off: no tower features, no adapter


def test_each_term_is_unchanged_when_the_batch_is_repeated():
    student, teacher = _model(0).eval(), _model(1, channels=48, stacked=3).eval()
    criterion = _criterion(student, teacher)
    images = _images()
    once, twice = _terms(criterion, images), _terms(criterion, torch.cat([images, images]))
    assert set(once) == KD_KEYS
    for k in KD_KEYS:
        assert torch.allclose(once[k], twice[k], rtol=1e-4, atol=1e-6), (k, once[k], twice[k])


def test_class_terms_use_paired_classes_and_are_off_without_a_pair():
    student, teacher = _model(0), _model(1, classes=2).eval()
    student.cfg.classes, teacher.cfg.classes = ["cat", "dog", "eel"], ["x", "y"]
    terms = _terms(_criterion(student, teacher), _images())
    assert set(terms) == {"crosskd_reg"}  # no class in common: box imitation only
    teacher.cfg.classes = ["dog", "y"]
    criterion = _criterion(student, teacher)
    assert criterion.class_report()["kd"] == "on"
    terms = _terms(criterion, _images())
    assert set(terms) == KD_KEYS
    # BCKD's classification compares student column 1 ("dog") with teacher column 0 only.
    s = head_outputs(student, _images(), False)
    t = criterion.teacher_forward(_images())
    valid = torch.ones(s.cls.shape[:2], dtype=torch.bool)
    expected = bckd_cls_loss(s.cls[..., 1:2], t.cls[..., 0:1], valid, 1.0)
    assert torch.allclose(terms["bckd_cls"], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------- training loop


def test_run_trains_the_student_and_leaves_the_teacher_bit_identical(tmp_path):
    data = make_synthetic(
        tmp_path / "data", num_train=4, num_val=2, image_size=(128, 96), seed=5, max_objects=2, num_classes=2
    )
    teacher_path = tmp_path / "teacher.pt"
    torch.manual_seed(3)
    atomic_save(detector_state(build_detector("gfl_small", 2, ["0", "1"]), {}), teacher_path)
    spec = LocalJobSpec.model_validate(
        {
            "kind": "distill",
            "dataset": str(data),
            "student": {"arch": "gfl_tiny"},
            "teacher": {"path": str(teacher_path)},
            "distill": {"method": "crosskd", "weights": {"bckd_cls": 1, "bckd_loc": 1}},
            "schedule": {"epochs": 1, "batch_size": 2, "image_size": [128, 96], "warmup_iters": 1, "num_workers": 0},
            "seed": 1,
        }
    )
    trainer = Trainer(spec, tmp_path / "run", report_every_s=0)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert isinstance(trainer.criterion, DistillCriterion) and set(trainer.criterion.adapters) == {"crosskd"}
    adapter_ids = {id(p) for p in trainer.criterion.adapters.parameters()}
    assert adapter_ids <= {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    images, targets = next(iter(trainer.train_loader))
    assert KD_KEYS <= set(trainer.step(images, targets).losses)
    trainer.train()
    after = trainer.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(student_before[k], v) for k, v in trainer.model.state_dict().items())
    # The adapter is the criterion's: checkpointed with the training state, never in the student's weights.
    from distill.checkpoint import read_checkpoint

    last = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert any(k.startswith("crosskd.") for k in last["training"]["adapters"])
    assert not any("crosskd" in k for k in last["state_dict"])

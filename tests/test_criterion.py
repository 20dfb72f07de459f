"""The criteria: the same losses as the training step computed before they existed, the weights of
``JobSpec.loss`` (every job kind), the location cache and the typed positives."""

from pathlib import Path

import pytest
import torch

from distill.boxes import distance_to_box
from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.data.synthetic import make_synthetic
from distill.locations import square_anchors
from distill.models.gfl import GFL, DetectorConfig
from distill.outputs import GroundTruth, head_outputs, pad_targets
from distill.spec import DistillSpec, GFLWeights, LocalJobSpec
from distill.task_criteria import GFLCriterion
from distill.train import Trainer

GT = GroundTruth(
    torch.tensor([[[10.0, 12, 60, 70], [70, 20, 120, 90]], [[30, 8, 100, 60], [0, 0, 0, 0]]]),
    torch.tensor([[1, 2], [0, 0]]),
    torch.tensor([[True, True], [True, False]]),
)


def _tiny(seed: int, perturb: int | None = None) -> GFL:
    torch.manual_seed(seed)
    model = GFL(DetectorConfig(depth=18, base_width=16, channels=32, stacked_convs=2, num_classes=3))
    if perturb is not None:  # head weights far from their flat initialisation, so every term is well above 0
        g = torch.Generator().manual_seed(perturb)
        with torch.no_grad():
            for conv in (model.bbox_head.gfl_reg, model.bbox_head.gfl_cls):
                conv.weight.add_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def batch():
    student, teacher = _tiny(0, perturb=4), _tiny(1, perturb=2).eval()
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    return student, teacher, images


# Recorded on these inputs with the training step as it was before the criteria (commit 799ebb4: losses
# assembled in Trainer.step, distillation_losses, gfl_losses with a string-keyed state). On the machine that
# recorded them the new code gives the same float32 values bit for bit (and the same weights after 4 SGD
# steps of 6 job configurations); the tolerance only allows for other CPUs' convolution kernels.
RECORDED = {
    "qfl": 1.166063904762268,
    "giou": 1.805277943611145,
    "dfl": 1.213077425956726,
    "main_ld": 1.5222234725952148,
    "main_kd": 2.313129425048828,
    "vlr_ld": 1.4631285667419434,
    "vlr_kd": 1.0535962581634521,
    "tbr": 0.36615079641342163,
}


@torch.no_grad()
def test_same_losses_as_before_the_criteria(batch):
    student, teacher, images = batch
    got: dict[str, float] = {}
    for spec in (
        DistillSpec.model_validate({"weights": {"vlr_kd": 0.5}}),
        DistillSpec.model_validate({"method": "tbr", "tbr_margin": 0.5, "weights": {"main_kd": 0}}),
    ):
        criterion = DistillCriterion(
            GFLCriterion(student, GFLWeights()), teacher, spec, map_classes(student.classes, teacher.classes)
        )
        got |= {
            k: float(v)
            for k, v in criterion.losses(
                head_outputs(student, images, False), criterion.teacher_forward(images), GT
            ).items()
        }
    assert got == pytest.approx(RECORDED, rel=1e-5, abs=1e-6)


@torch.no_grad()
def test_weights_come_from_the_job_and_zero_skips_the_term(batch):
    student, _, images = batch
    out = head_outputs(student, images, False)
    default, _ = GFLCriterion(student, GFLWeights()).losses(out, GT)
    assert list(default) == ["qfl", "giou", "dfl"]
    halved, _ = GFLCriterion(student, GFLWeights(cls=0.5, giou=1.0, dfl=0)).losses(out, GT)
    assert list(halved) == ["qfl", "giou"]
    torch.testing.assert_close(halved["qfl"], default["qfl"] / 2)
    torch.testing.assert_close(halved["giou"], default["giou"] / 2)
    assert GFLCriterion(student, GFLWeights(cls=0, giou=0, dfl=0)).losses(out, GT)[0] == {}


@torch.no_grad()
def test_locations_are_cached_per_size_and_positives_are_decoded_once(batch):
    student, _, images = batch
    criterion = GFLCriterion(student, GFLWeights())
    out = head_outputs(student, images, False)
    assert out.cls.shape == (2, 257, 3) and out.reg.shape == (2, 257, 4, 17)
    assert out.sizes == ((12, 16), (6, 8), (3, 4), (2, 2), (1, 1))
    loc = criterion.locations(out.sizes, out.cls.device)
    assert criterion.locations(out.sizes, out.cls.device) is loc  # computed once per input size
    points, strides, counts = student.locations(student.raw_outputs(images)[0])
    assert torch.equal(loc.points, points) and torch.equal(loc.strides, strides) and loc.counts == counts
    assert torch.equal(loc.anchors, square_anchors(points, strides))

    _, state = criterion.losses(out, GT)
    pos = state.positives
    assert state.assignment.positive.sum() == len(pos.b) == len(pos.a) == len(pos.gt) > 0
    assert torch.equal(state.assignment.gt_index[pos.b, pos.a], pos.gt)
    stride = loc.strides[pos.a][:, None]
    torch.testing.assert_close(pos.target, GT.boxes[pos.b, pos.gt] / stride)
    torch.testing.assert_close(pos.centre, loc.points[pos.a] / stride)
    torch.testing.assert_close(pos.pred, distance_to_box(pos.centre, student.bbox_head.integral(out.reg[pos.b, pos.a])))


def test_pad_targets():
    gt = pad_targets(
        [
            {"boxes": torch.tensor([[1.0, 2, 3, 4]]), "labels": torch.tensor([2])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        ],
        "cpu",
    )
    assert gt.boxes.shape == (2, 1, 4) and gt.labels.tolist() == [[2], [0]] and gt.valid.tolist() == [[True], [False]]


def test_a_train_job_sets_its_loss_weights(tmp_path: Path):
    data = make_synthetic(tmp_path / "data", num_train=2, num_val=0, image_size=(64, 64), seed=1, max_objects=2)

    def trainer(loss: dict, name: str) -> Trainer:
        spec = LocalJobSpec.model_validate(
            {
                "kind": "train",
                "dataset": str(data),
                "student": {"arch": "gfl_tiny"},
                "loss": loss,
                "schedule": {"epochs": 1, "batch_size": 2, "image_size": [64, 64], "num_workers": 0},
            }
        )
        return Trainer(spec, tmp_path / name, device="cpu")

    default, no_dfl = trainer({}, "default"), trainer({"dfl": 0}, "no_dfl")
    assert default.criterion.weights == GFLWeights() and no_dfl.criterion.weights.dfl == 0
    images, targets = next(iter(default.train_loader))
    with torch.no_grad():
        a, b = default.step(images, targets), no_dfl.step(images, targets)  # same seed: same weights
    assert set(a.losses) == {"qfl", "giou", "dfl"} and set(b.losses) == {"qfl", "giou"}
    assert torch.equal(a.losses["qfl"], b.losses["qfl"]) and torch.equal(a.losses["giou"], b.losses["giou"])
    torch.testing.assert_close(b.total, a.total - a.losses["dfl"])

"""CrossKD (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection", CVPR 2024), written
from the paper; DESIGN section 3.

The student's head features after tower layer ``k`` (cls and reg towers alike) are fed through the frozen
teacher's remaining tower layers and its predictors, giving *cross-head* outputs in the teacher's own
output space. They imitate the teacher's outputs, so the student learns what makes the teacher's head
answer as it does, without its own predictors being pulled away from the ground truth (the conflict the
paper attributes to plain prediction mimicking):

- before the teacher's layers, each level's student features are matched to the teacher's per channel:
  normalised by their own mean and standard deviation over ``(N, H, W)`` and rescaled to the teacher's
  (:func:`align_stats`); a 1x1 conv (:class:`CrossKDAdapter`, trained with the student, never exported)
  maps the channels first when the two heads' widths differ;
- classification: :func:`distill.losses.bckd.binary_kd` (BCE to the teacher's probability, weighted by
  ``|p_cross - p_T|^beta``), mean over the valid locations;
- regression: LD's KL on the edge distributions (:func:`distill.losses.ld.ld_loss`, temperature ``tau``),
  each location weighted by the teacher's largest class probability.

The gradient reaches the student through the teacher's layers; the teacher's parameters keep
``requires_grad=False`` and are never updated. Nothing here can come from a teacher cache: the cross-head
outputs depend on the student's current features.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill import ddp
from distill.losses.bckd import binary_kd
from distill.losses.ld import ld_loss
from distill.losses.reduce import weighted_mean
from distill.models.gfl import GFLHead


class CrossKDAdapter(nn.Module):
    """1x1 convs from the student's head width to the teacher's, one per tower (the towers are shared by the
    levels, so are these)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.cls = nn.Conv2d(student_channels, teacher_channels, 1)
        self.reg = nn.Conv2d(student_channels, teacher_channels, 1)


def align_stats(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """``student (N, C, H, W)`` with each channel's mean and standard deviation over ``(N, H, W)`` replaced by
    the ``teacher``'s ``(N, C, H, W)`` (detached). Population statistics, so a batch repeated twice aligns
    the same way; a constant channel (a 1x1 map of one image) becomes the teacher's mean."""
    s, t = student.float(), teacher.detach().float()
    (s_mean, s_std), (t_mean, t_std) = _moments(s), _moments(t)
    return (s - s_mean) / (s_std + eps) * t_std + t_mean


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel mean and population standard deviation of ``x (N, C, H, W)`` over ``(N, H, W)``, each
    ``(1, C, 1, 1)``, over the global batch: under several processes from all-reduced sums (differentiable,
    :func:`distill.ddp.global_sum`), so every rank aligns with the statistics one process would use."""
    dims = (0, 2, 3)
    if ddp.world() == 1:
        return x.mean(dims, keepdim=True), x.std(dims, unbiased=False, keepdim=True)
    count = ddp.global_sum(x.new_tensor(float(x.shape[0] * x.shape[2] * x.shape[3])))
    mean = ddp.global_sum(x.sum(dims, keepdim=True)) / count
    var = ddp.global_sum((x * x).sum(dims, keepdim=True)) / count - mean * mean
    return mean, var.clamp(min=1e-12).sqrt()


def cross_head(
    teacher_head: GFLHead,
    student_feats: tuple[list[Tensor], list[Tensor]],
    teacher_feats: tuple[list[Tensor], list[Tensor]],
    k: int,
    adapter: CrossKDAdapter | None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The cross-head outputs per level: the student's ``(cls, reg)`` tower features after layer ``k`` (lists
    over levels of ``(N, C_S, H_l, W_l)``, as :meth:`GFLHead.forward_tower` holds them) through ``adapter``
    (if any), aligned to the teacher's features of the same layer, then through the rest of
    ``teacher_head``. Returns ``cls (N, C, H_l, W_l)`` and ``reg (N, 4 * (R + 1), H_l, W_l)`` per level,
    with the graph back to the student's features."""
    cls_out, reg_out = [], []
    for level, (s_cls, s_reg, t_cls, t_reg) in enumerate(zip(*student_feats, *teacher_feats, strict=True)):
        if adapter is not None:
            s_cls, s_reg = adapter.cls(s_cls), adapter.reg(s_reg)
        c, r = teacher_head.from_tower(
            align_stats(s_cls, t_cls).to(s_cls.dtype), align_stats(s_reg, t_reg).to(s_reg.dtype), k, level
        )
        cls_out.append(c)
        reg_out.append(r)
    return cls_out, reg_out


def crosskd_cls_loss(
    cross_cls: Tensor, t_cls: Tensor, valid: Tensor, beta: float, columns: Tensor | None = None
) -> Tensor:
    """Mean :func:`binary_kd` of the cross-head logits to the teacher's over the valid locations:
    ``cross_cls``, ``t_cls (B, A, C_T)``, ``valid (B, A)`` bool; ``columns (M,)``: the teacher classes the
    student's classes pair with (None: all)."""
    b, a = valid.nonzero(as_tuple=True)
    x, t = cross_cls[b, a], t_cls[b, a]
    if columns is not None:
        x, t = x[:, columns], t[:, columns]
    return weighted_mean(binary_kd(x, t, beta), None)


def crosskd_reg_loss(cross_reg: Tensor, t_reg: Tensor, t_cls: Tensor, valid: Tensor, tau: float) -> Tensor:
    """LD per edge between the cross-head and the teacher's edge distributions, each valid location weighted
    by the teacher's largest class probability: ``cross_reg``, ``t_reg (B, A, 4, R + 1)``, ``t_cls (B, A,
    C_T)``, ``valid (B, A)``."""
    b, a = valid.nonzero(as_tuple=True)
    bins = cross_reg.shape[-1]
    per_edge = ld_loss(cross_reg[b, a].reshape(-1, bins), t_reg[b, a].reshape(-1, bins), tau).reshape(-1, 4)
    weight = t_cls[b, a].detach().float().sigmoid().max(-1).values
    return weighted_mean(per_edge.mean(1), weight)

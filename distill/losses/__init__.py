"""Loss functions, one value per row before weighting: ``distill.losses.gfl`` holds the GFL detector's own
(QFL, DFL, GIoU) and their assembly (GFocalV2's too), ``distill.losses.focal`` those of RetinaNet, FCOS and
ATSS (focal loss, with ``distill.losses.centerness``); ``distill.losses.ld`` the distillation terms (LD,
sigmoid KD), which are re-exported here."""

from distill.losses.ld import ld_loss, sigmoid_kd_loss

__all__ = ["ld_loss", "sigmoid_kd_loss"]

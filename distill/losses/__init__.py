"""Loss functions: the GFL detector's own (QFL, DFL, GIoU) and the distillation terms (LD, sigmoid KD)."""

from distill.losses.ld import ld_loss, sigmoid_kd_loss

__all__ = ["ld_loss", "sigmoid_kd_loss"]

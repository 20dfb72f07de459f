"""The detector's configuration: architecture, classes and inference settings, saved in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from distill.spec import FAMILIES, REG_MAX, STRIDES


@dataclass
class DetectorConfig:
    # A checkpoint saved before the families existed has no ``family``: it is a GFL.
    family: str = "gfl"
    depth: int = 18
    base_width: int = 64
    channels: int = 256
    stacked_convs: int = 4
    num_classes: int = 80
    reg_max: int = REG_MAX
    strides: tuple[int, ...] = STRIDES
    # Inference (DESIGN section 2).
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_img: int = 100
    # Backbone regime: freezing the stem and batch-norm statistics only helps with pretrained weights.
    frozen_stages: int = -1
    norm_eval: bool = False
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown detector family {self.family!r}; families: {', '.join(FAMILIES)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "strides" in known:
            known["strides"] = tuple(known["strides"])
        return cls(**known)

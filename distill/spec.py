"""The job spec: the body of ``POST /v1/jobs`` and the input of ``python -m distill train``.

Pure pydantic (no torch) so the API can validate jobs without importing the training stack.
Every field but ``kind`` and ``dataset`` has a default; unknown fields are refused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# name -> (backbone depth, backbone base width, FPN/head channels, stacked convs).
# ``gfl_tiny`` is a narrow ResNet-18 layout for tests and CPU demos, ``gfl_small`` (4x its parameters) a CPU
# teacher for it; the rest are torchvision ResNets with the paper's 256-channel FPN and 4 stacked convs.
ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    "gfl_tiny": (18, 16, 32, 2),
    "gfl_small": (18, 32, 64, 4),
    "gfl_r18": (18, 64, 256, 4),
    "gfl_r34": (34, 64, 256, 4),
    "gfl_r50": (50, 64, 256, 4),
    "gfl_r101": (101, 64, 256, 4),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudentSpec(_Strict):
    arch: str = Field("gfl_r18", examples=["gfl_r18"])
    pretrained: str | None = Field(
        None, description="Local path to backbone weights (torchvision ResNet state dict); none are downloaded."
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {v!r}; known: {', '.join(ARCHITECTURES)}")
        return v


class TeacherSpec(_Strict):
    """Exactly one source. ``path`` is for local runs; the API refuses it and resolves the others to it."""

    model: str | None = None
    job: str | None = None
    checkpoint: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TeacherSpec:
        given = [k for k in ("model", "job", "checkpoint", "path") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("teacher needs exactly one of 'model', 'job', 'checkpoint' (or 'path' locally)")
        return self


class LossWeights(_Strict):
    """The weights l0..l6 of the paper's eq. 5 (plus DFL). A weight of 0 switches the term off."""

    cls: float = Field(1.0, ge=0, description="l0: quality focal loss")
    giou: float = Field(2.0, ge=0, description="l1: GIoU box loss")
    dfl: float = Field(0.25, ge=0, description="distribution focal loss")
    # Settled by bench/ablation.py (bench/results/tuning/): with our per-region means, LD at 1.0 did not
    # help on its own (AP 55.7 vs 56.6 alone), at 0.25 it did (59.4); KD at 1.0 beat 0.5 and 0.25 beside it.
    main_ld: float = Field(0.25, ge=0, description="l3: LD on the main region")
    vlr_ld: float = Field(0.25, ge=0, description="l4: LD on the valuable localization region")
    main_kd: float = Field(1.0, ge=0, description="l5: classification KD on the main region")
    vlr_kd: float = Field(0.0, ge=0, description="l6: classification KD on the VLR")
    tbr: float = Field(1.0, ge=0, description="pseudo-box regression weight (method 'tbr')")
    fitnets: float = Field(1.0, ge=0, description="feature imitation weight (method 'fitnets')")


class DistillSpec(_Strict):
    method: Literal["ld", "tbr", "fitnets"] = "ld"
    tau: float = Field(10.0, gt=0, description="LD temperature")
    gamma: float = Field(0.25, ge=0, le=1, description="VLR lower bound as a fraction of alpha_pos")
    kd_tau: float = Field(2.0, gt=0, description="classification KD temperature")
    tbr_margin: float = Field(0.0, ge=0, description="TBR margin epsilon (eq. 6)")
    weights: LossWeights = Field(default_factory=LossWeights)


class ScheduleSpec(_Strict):
    epochs: int = Field(12, ge=1, le=1000)
    batch_size: int = Field(16, ge=1, le=512)
    lr: float | None = Field(None, gt=0, description="defaults to 0.01 * batch_size / 16")
    image_size: tuple[int, int] = Field(
        (1333, 800), description="(long side, short side) limits of the keep-ratio resize"
    )
    warmup_iters: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    steps: tuple[int, ...] | None = Field(
        None, description="epochs at which the lr drops x0.1; default: 2/3 and 11/12 of the run (8, 11 of 12)"
    )
    grad_clip: float | None = Field(35.0, gt=0)
    num_workers: int = Field(2, ge=0, le=32)
    amp: bool = Field(True, description="mixed precision (used on GPU only)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N iterations (always at each epoch end)"
    )

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32 or max(v) > 4096:
            raise ValueError("image_size sides must be within [32, 4096]")
        return (max(v), min(v))

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 0.01 * self.batch_size / 16

    @property
    def lr_steps(self) -> tuple[int, ...]:
        if self.steps is not None:
            return self.steps
        return (max(1, round(self.epochs * 8 / 12)), max(1, round(self.epochs * 11 / 12)))


class JobSpec(_Strict):
    kind: Literal["train", "distill"]
    name: str | None = Field(None, max_length=200)
    dataset: str = Field(..., description="dataset id (service) or a local dataset folder (python -m distill)")
    val_split: float = Field(0.2, ge=0, lt=1, description="used when the dataset has no split of its own")
    student: StudentSpec = Field(default_factory=StudentSpec)
    teacher: TeacherSpec | None = None
    distill: DistillSpec | None = None
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _kind_fields(self) -> JobSpec:
        if self.kind == "train":
            if self.teacher is not None or self.distill is not None:
                raise ValueError("kind 'train' takes no 'teacher' or 'distill'")
        else:
            if self.teacher is None:
                raise ValueError("kind 'distill' needs a 'teacher'")
            if self.distill is None:
                self.distill = DistillSpec()
        return self


def arch_config(arch: str) -> dict[str, int]:
    depth, width, channels, stacked = ARCHITECTURES[arch]
    return {"depth": depth, "base_width": width, "channels": channels, "stacked_convs": stacked}

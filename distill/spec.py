"""The job spec: :class:`JobSpec` is the body of ``POST /v1/jobs`` (files only by id, never a path);
:class:`LocalJobSpec` is the input of ``python -m distill train`` (files by local path).

Pure pydantic (no torch) so the API can validate jobs without importing the training stack.
Every field but ``kind`` and ``dataset`` has a default; unknown fields are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ResNet blocks per stage, and whether the blocks are bottlenecks (torchvision's layouts).
RESNET_LAYERS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}
# Every architecture's box head (DESIGN section 2): edge distributions over reg_max + 1 bins, FPN P3-P7.
REG_MAX = 16
STRIDES = (8, 16, 32, 64, 128)

# The dense detector families (DESIGN section 2): every one regresses edge distributions, on the same ResNet,
# FPN and towers; they differ in the head, the anchors per location and the assignment.
FAMILIES = ("gfl", "gflv2", "atss", "fcos", "retina")
# Anchors per location: RetinaNet's 3 scales x 3 ratios (``distill.locations.retina_anchor_sizes``); the
# others are anchor-free or one-anchor heads.
NUM_ANCHORS = {"gfl": 1, "gflv2": 1, "atss": 1, "fcos": 1, "retina": 9}

# size -> (backbone depth, backbone base width, FPN/head channels, stacked convs).
# ``tiny`` is a narrow ResNet-18 layout for tests and CPU demos, ``small`` (4x its parameters) a CPU teacher
# for it; the rest are torchvision ResNets with the paper's 256-channel FPN and 4 stacked convs.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (18, 16, 32, 2),
    "small": (18, 32, 64, 4),
    "r18": (18, 64, 256, 4),
    "r34": (34, 64, 256, 4),
    "r50": (50, 64, 256, 4),
    "r101": (101, 64, 256, 4),
}
# ``<family>_<size>`` -> the size's layout, e.g. ``gfl_r18``, ``retina_tiny``.
ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    f"{family}_{size}": layout for family in FAMILIES for size, layout in SIZES.items()
}


# What an architecture name is, for the API schema and the CLI's help.
ARCH_HELP = f"<family>_<size>: family {', '.join(FAMILIES)}; size {', '.join(SIZES)}"


def arch_family(arch: str) -> str:
    """The family of an architecture name (``retina_r50`` -> ``retina``; also our ``gfl_r18_w64_c256`` names
    for checkpoints whose layout matches no size)."""
    family = arch.split("_", 1)[0]
    if family not in FAMILIES:
        raise ValueError(f"architecture {arch!r} names no detector family; families: {', '.join(FAMILIES)}")
    return family


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Architectures whose backbone is a torchvision ResNet with ImageNet weights (DESIGN section 2).
# torchvision's ResNet{depth}_Weights.IMAGENET1K_V1 files (the API checks its cache without torch;
# tests/test_init.py checks these against torchvision's own table).
_RESNET_URLS = {
    "r18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "r34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "r50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "r101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
IMAGENET_URLS = {f"{family}_{size}": url for family in FAMILIES for size, url in _RESNET_URLS.items()}
IMAGENET_ARCHS = tuple(IMAGENET_URLS)
_ID = r"^[a-z]+_[0-9a-z]{8,64}$"  # ids the service makes (a prefix, "_", letters and digits); never a path


class InitCheckpoint(_Strict):
    checkpoint: str = Field(..., pattern=_ID, description="id of an upload from POST /v1/checkpoints")


class InitPath(_Strict):
    """Local runs only (``python -m distill train``): a checkpoint file on this machine."""

    path: str


Init = Literal["imagenet"] | InitCheckpoint | None


class StudentSpec(_Strict):
    """The model a job trains: the student of a distillation, or the detector of a ``train`` job."""

    arch: str = Field(
        "gfl_r18",
        examples=["gfl_r18", "retina_r50", "fcos_tiny"],
        description=f"{ARCH_HELP} (DESIGN section 2; tiny and small are narrow CPU models, r18 to r101 "
        "torchvision's ResNets)",
        json_schema_extra={"enum": list(ARCHITECTURES)},
    )
    init: Init = Field(
        None,
        description="null: from scratch; 'imagenet': torchvision's ImageNet weights for the ResNet backbone; "
        "{'checkpoint': id}: an uploaded detector (every tensor whose name and shape match) or ResNet backbone",
    )
    frozen_stages: int | None = Field(
        None,
        ge=-1,
        le=4,
        description="backbone stages kept frozen (0 = stem); default: 1 with pretrained "
        "weights (mmdetection's recipe), -1 (none) from scratch",
    )
    norm_eval: bool | None = Field(
        None, description="freeze batch-norm statistics; default: true with pretrained weights, false from scratch"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {v!r}; known: {', '.join(ARCHITECTURES)}")
        return v

    @field_validator("init", mode="before")
    @classmethod
    def _init_form(cls, v: object) -> object:
        if isinstance(v, str) and v != "imagenet":
            raise ValueError(
                "init must be null, 'imagenet' or {'checkpoint': id}; files reach the service only by "
                "upload (POST /v1/checkpoints), never by a path"
            )
        return v

    @model_validator(mode="after")
    def _imagenet_arch(self) -> StudentSpec:
        if self.init == "imagenet" and self.arch not in IMAGENET_ARCHS:
            raise ValueError(
                f"init 'imagenet': {self.arch} has no ImageNet weights (its backbone is a narrow "
                f"ResNet of our own); use one of {', '.join(IMAGENET_ARCHS)}, or init null"
            )
        return self

    @property
    def pretrained(self) -> bool:
        return self.init is not None

    @property
    def backbone_frozen_stages(self) -> int:
        return self.frozen_stages if self.frozen_stages is not None else (1 if self.pretrained else -1)

    @property
    def backbone_norm_eval(self) -> bool:
        return self.norm_eval if self.norm_eval is not None else self.pretrained


class LocalStudentSpec(StudentSpec):
    init: Init | InitPath = None  # type: ignore[assignment]

    @field_validator("init", mode="before")
    @classmethod
    def _init_form(cls, v: object) -> object:
        return v


class TeacherSpec(_Strict):
    """Exactly one source, by id."""

    model: str | None = Field(None, pattern=_ID)
    job: str | None = Field(None, pattern=_ID)
    checkpoint: str | None = Field(None, pattern=_ID)

    @model_validator(mode="after")
    def _exactly_one(self) -> TeacherSpec:
        given = [k for k in ("model", "job", "checkpoint") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("teacher needs exactly one of 'model', 'job', 'checkpoint'")
        return self


class LocalTeacherSpec(_Strict):
    """Local runs only: the teacher's checkpoint file (ours or mmdetection's)."""

    path: str


class GFLWeights(_Strict):
    """The detector's own loss weights (l0..l2 of the paper's eq. 5); every job kind has them."""

    cls: float = Field(1.0, ge=0, description="l0: quality focal loss")
    giou: float = Field(2.0, ge=0, description="l1: GIoU box loss")
    dfl: float = Field(0.25, ge=0, description="l2: distribution focal loss")


Method = Literal[
    "ld", "crosskd", "bckd", "tbr", "fitnets", "inside_gt", "main_region", "fine_grained", "defeat", "gi", "pkd"
]
# Feature imitation on the FPN levels (paper table 3, and PKD): distill.losses.imitation.
IMITATION_TERMS = ("fitnets", "inside_gt", "main_region", "fine_grained", "defeat", "gi", "pkd")

# The weights each method switches on by default (every other distillation weight defaults to 0). A job may
# set any weight whatever its method, so combinations (CrossKD + VLR LD, BCKD + Main LD) are ordinary jobs.
# LD's were settled by bench/ablation.py (bench/results/tuning/): with our per-region means, LD at 1.0 did not
# help on its own (AP 55.7 vs 56.6 alone), at 0.25 it did (59.4); KD at 1.0 beat 0.5 and 0.25 beside it.
# CrossKD's and BCKD's classification terms are means over every location (mostly background), about 1/10 of
# the authors' sums over locations divided by the positives at our input sizes, hence 8 where they use 1; their
# box terms are weighted means of the same order as the authors' (bench/results/tuning/README.md).
METHOD_WEIGHTS: dict[str, dict[str, float]] = {
    "ld": {"main_ld": 0.25, "vlr_ld": 0.25, "main_kd": 1.0},
    "crosskd": {"crosskd_cls": 8.0, "crosskd_reg": 1.0},
    "bckd": {"bckd_cls": 8.0, "bckd_loc": 2.0},
    "tbr": {"main_kd": 1.0, "tbr": 1.0},
    "fitnets": {"main_kd": 1.0, "fitnets": 1.0},
    # Each feature imitation alone (paper table 3's first column); "LD + it" is a row with both weights set.
    **{name: {name: 1.0} for name in ("inside_gt", "main_region", "fine_grained", "defeat", "gi", "pkd")},
}


class LossWeights(_Strict):
    """The distillation weights: l3..l6 of the paper's eq. 5, and the terms of the methods that followed it
    or that it compared against. A weight of 0 switches its term off and skips its computation; a weight left
    out takes the default of the job's ``distill.method`` (:data:`METHOD_WEIGHTS`), 0 for the others."""

    main_ld: float | None = Field(None, ge=0, description="l3: LD on the main region")
    vlr_ld: float | None = Field(None, ge=0, description="l4: LD on the valuable localization region")
    main_kd: float | None = Field(None, ge=0, description="l5: classification KD on the main region")
    vlr_kd: float | None = Field(None, ge=0, description="l6: classification KD on the VLR")
    crosskd_cls: float | None = Field(None, ge=0, description="CrossKD: cross-head classification imitation")
    crosskd_reg: float | None = Field(None, ge=0, description="CrossKD: cross-head edge-distribution imitation")
    bckd_cls: float | None = Field(None, ge=0, description="BCKD: binary classification distillation")
    bckd_loc: float | None = Field(None, ge=0, description="BCKD: GIoU to the teacher's boxes")
    tbr: float | None = Field(None, ge=0, description="TBR: teacher-bounded pseudo-box regression")
    fitnets: float | None = Field(None, ge=0, description="FitNets: FPN feature imitation, whole maps")
    inside_gt: float | None = Field(None, ge=0, description="feature imitation inside the ground-truth boxes")
    main_region: float | None = Field(None, ge=0, description="feature imitation in the Main region")
    fine_grained: float | None = Field(None, ge=0, description="Fine-Grained feature imitation (near objects)")
    defeat: float | None = Field(None, ge=0, description="DeFeat: imitation inside and outside the boxes apart")
    gi: float | None = Field(None, ge=0, description="GI imitation: where teacher and student disagree most")
    pkd: float | None = Field(None, ge=0, description="PKD: imitation of channel-normalised features (Pearson)")

    def filled(self, method: str) -> LossWeights:
        """These weights with every weight left out set to ``method``'s default."""
        defaults = METHOD_WEIGHTS[method]
        return LossWeights(**{k: v if v is not None else defaults.get(k, 0.0) for k, v in self.model_dump().items()})

    def value(self, name: str) -> float:
        """A term's weight (0 when left out and not yet filled)."""
        return float(getattr(self, name) or 0.0)


class DistillSpec(_Strict):
    method: Method = Field(
        "ld",
        description="which terms are on by default: 'ld' (Main LD + VLR LD + Main KD), "
        "'crosskd', 'bckd', 'tbr', and the feature imitations 'fitnets', 'inside_gt', 'main_region', "
        "'fine_grained', 'defeat', 'gi', 'pkd' (each alone); any weight may still be set, so LD + an imitation is "
        "method 'ld' with that imitation's weight",
    )
    tau: float = Field(10.0, gt=0, description="LD temperature")
    gamma: float = Field(0.25, ge=0, le=1, description="VLR lower bound as a fraction of alpha_pos")
    kd_tau: float = Field(2.0, gt=0, description="classification KD temperature")
    tbr_margin: float = Field(0.0, ge=0, description="TBR margin epsilon (eq. 6)")
    crosskd_layer: int | None = Field(
        None,
        ge=0,
        description="CrossKD: the student's head features after this tower layer (0 = the FPN "
        "level) go through the teacher's layers after it; at most both heads' stacked convs; default: one "
        "before the last layer both heads have (3 for two 4-conv heads, the paper's choice)",
    )
    crosskd_beta: float = Field(1.0, ge=0, description="CrossKD: classification weight |p_cross - p_T|^beta")
    bckd_beta: float = Field(1.0, ge=0, description="BCKD: classification weight |p_S - p_T|^beta")
    weights: LossWeights = Field(default_factory=LossWeights)
    class_map: dict[str, str] | None = Field(
        None,
        description="dataset class -> teacher class for KD; default: classes with the same name "
        "(case-insensitive). Dataset classes without a teacher class get no KD; LD needs no classes.",
    )
    teacher_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="reuse the teacher's outputs per (image, flip) across epochs: 'auto' where the "
        "schedule and terms allow it, 'on' refuses a job where they do not, 'off' never",
    )
    allow_teacher_overlap: bool = Field(
        False,
        description="run even though the teacher was trained on some of this job's validation images (matched "
        "by content): its AP there is inflated and distillation passes their labels on, so the job is refused "
        "unless this is true; recorded in the job's metrics (teacher_overlap) and shown in study reports",
    )

    @model_validator(mode="after")
    def _fill_weights(self) -> DistillSpec:
        self.weights = self.weights.filled(self.method)
        return self


class ScheduleSpec(_Strict):
    epochs: int = Field(12, ge=1, le=1000)
    batch_size: int = Field(16, ge=1, le=512)
    lr: float | None = Field(None, gt=0, description="defaults to 0.01 * batch_size / 16")
    image_size: tuple[int, int] = Field(
        (1333, 800), description="(long side, short side) limits of the keep-ratio resize"
    )
    scales: list[tuple[int, int]] | None = Field(
        None,
        min_length=1,
        description="multi-scale training: each training image is resized, each epoch, to "
        "one of these (long side, short side) limits drawn at random; validation keeps image_size",
    )
    warmup_iters: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0, le=1)
    steps: tuple[int, ...] | None = Field(
        None, description="epochs at which the lr drops x0.1; default: 2/3 and 11/12 of the run (8, 11 of 12)"
    )
    grad_clip: float | None = Field(35.0, gt=0)
    num_workers: int | None = Field(
        None,
        ge=0,
        le=32,
        description="data loader workers per process; default: the machine's cores shared "
        "between the job's processes, one left for training, 1 to 8 (results do not depend on it)",
    )
    amp: bool = Field(True, description="mixed precision (used on GPU only)")
    checkpoint_every: int | None = Field(
        None, ge=1, description="also checkpoint every N iterations (always at each epoch end)"
    )
    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="processes of one job (torch.distributed: NCCL on GPUs, gloo on "
        "CPU); batch_size is the global batch, split evenly between them",
    )

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32 or max(v) > 4096:
            raise ValueError("image_size sides must be within [32, 4096]")
        return (max(v), min(v))

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        return None if v is None else [cls._size(s) for s in v]

    @model_validator(mode="after")
    def _even_split(self) -> ScheduleSpec:
        if self.batch_size % self.gpus:
            raise ValueError(f"batch_size {self.batch_size} does not split evenly over {self.gpus} processes")
        if self.steps is not None and any(not 1 <= e <= self.epochs - 1 for e in self.steps):
            # A decay at epoch 0 skips the base rate entirely; at or past the last epoch it never happens.
            raise ValueError(f"schedule.steps {list(self.steps)} must lie within epochs 1..{self.epochs - 1}")
        return self

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 0.01 * self.batch_size / 16

    @property
    def lr_steps(self) -> tuple[int, ...]:
        if self.steps is not None:
            return self.steps
        return (max(1, round(self.epochs * 8 / 12)), max(1, round(self.epochs * 11 / 12)))


ExportFormat = Literal["fp32", "int8", "fp16", "bf16"]


class ExportSpec(_Strict):
    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["fp32"],
        min_length=1,
        description="ONNX models to publish; fp32 is always published (the others are measured against it)",
    )

    @field_validator("formats")
    @classmethod
    def _fp32_first(cls, v: list[str]) -> list[str]:
        return ["fp32"] + sorted({f for f in v if f != "fp32"}, key=("int8", "fp16", "bf16").index)


class JobSpec(_Strict):
    kind: Literal["train", "distill"]
    name: str | None = Field(None, max_length=200)
    dataset: str = Field(..., pattern=_ID, description="dataset id (from POST /v1/datasets)")
    val_split: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="deprecated: a data set's split is fixed at upload (POST /v1/datasets val_split, split_seed) "
        "and the same for every job; a value other than the data set's is refused (422 split_conflict)",
    )
    student: StudentSpec = Field(default_factory=StudentSpec)
    teacher: TeacherSpec | None = None
    loss: GFLWeights = Field(default_factory=GFLWeights)
    distill: DistillSpec | None = None
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
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


class LocalJobSpec(JobSpec):
    """What ``python -m distill train`` runs: a job whose files are local paths (a dataset folder, the
    teacher's and the initial weights' files). The service resolves a :class:`JobSpec`'s ids to this
    (``core.checks.resolve_job``); REST clients never see it."""

    dataset: str = Field(..., min_length=1, description="a local dataset folder")
    student: LocalStudentSpec = Field(default_factory=LocalStudentSpec)
    teacher: LocalTeacherSpec | None = None  # type: ignore[assignment]
    # A folder whose images name no validation or test split is split by a draw of val_split seeded by
    # split_seed (distill.data.annotations.split), never by the training seed; the service passes its data set's.
    val_split: float = Field(0.2, ge=0, lt=1)  # type: ignore[assignment]
    split_seed: int = Field(0, ge=0, le=2**31 - 1)
    # What the job check found about the teacher's training images and this job's validation images
    # (core.checks.teacher_overlap); training copies it into metrics["teacher_overlap"].
    teacher_overlap: dict[str, Any] | None = None


def teacher_cache_blocker(job: JobSpec) -> str | None:
    """Why the teacher's outputs of ``job`` cannot be computed once per (image, flip) and reused in later
    epochs (``distill.teacher_cache``, DESIGN section 3); None when they can. The loader's only random
    augmentations are the flip (part of the cache key) and ``schedule.scales``."""
    if job.distill is None:
        return "not a distillation: there is no teacher"
    w = job.distill.weights.value
    if job.schedule.scales and len(set(job.schedule.scales)) > 1:
        return (
            f"random scales (schedule.scales {[list(s) for s in job.schedule.scales]}): the teacher sees an "
            "image at another size in each epoch"
        )
    if w("crosskd_cls") > 0 or w("crosskd_reg") > 0:
        return "CrossKD passes the student's features through the teacher's head: its outputs change every step"
    if on := [n for n in IMITATION_TERMS if w(n) > 0]:
        return f"feature imitation ({', '.join(on)}) reads the teacher's FPN features, which the cache does not hold"
    return None


def crosskd_layer_problem(k: int, student_convs: int, teacher_convs: int) -> str | None:
    """Why CrossKD cannot read tower layer ``k`` (None if it can): the layer must exist in the student's tower
    and the teacher must have it too, i.e. ``0 <= k <= min(student_convs, teacher_convs)``. Shared by the job
    check (torch-free) and the criterion."""
    if 0 <= k <= min(student_convs, teacher_convs):
        return None
    return (
        f"distill.crosskd_layer {k} is outside the heads' towers: the student has {student_convs} stacked "
        f"convs and the teacher {teacher_convs}, so it must be within [0, {min(student_convs, teacher_convs)}]"
    )


def crosskd_default_layer(student_convs: int, teacher_convs: int) -> int:
    """CrossKD's tower layer when the job leaves it out: one before the last layer both heads have, so the
    teacher's last conv and its predictors are reused; 3 for two 4-conv GFL heads, the paper's choice."""
    return max(min(student_convs, teacher_convs) - 1, 0)


def teacher_cache_refusal(job: JobSpec) -> str | None:
    """Why ``distill.teacher_cache: "on"`` is refused for ``job`` (None: it is not "on", or it can apply)."""
    if job.distill is None or job.distill.teacher_cache != "on" or not (why := teacher_cache_blocker(job)):
        return None
    return f"distill.teacher_cache is 'on' but the teacher's outputs cannot be cached: {why}; use 'auto' or 'off'"


def arch_config(arch: str) -> dict[str, str | int | tuple[int, ...]]:
    """The detector config of a named architecture (``distill.models.config.DetectorConfig`` fields)."""
    depth, width, channels, stacked = ARCHITECTURES[arch]
    return {
        "family": arch_family(arch),
        "depth": depth,
        "base_width": width,
        "channels": channels,
        "stacked_convs": stacked,
        "reg_max": REG_MAX,
        "strides": STRIDES,
    }


def arch_name(depth: int | None, base_width: int, channels: int, stacked_convs: int, family: str = "gfl") -> str | None:
    """The name of :data:`ARCHITECTURES` with this family and layout, or None."""
    layout = (depth, base_width, channels, stacked_convs)
    return next((f"{family}_{size}" for size, v in SIZES.items() if v == layout and family in FAMILIES), None)

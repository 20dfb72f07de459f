"""Response bodies of the REST API (documentation and OpenAPI examples; requests use ``distill.spec``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    # The store may add fields over time; clients should ignore what they do not know.
    model_config = ConfigDict(extra="allow")


class DatasetSplit(_Open):
    """The split every job and study on the data set uses, fixed at upload."""

    source: Literal["drawn", "own", "unknown"] = Field(
        ...,
        description="drawn: a seeded draw of val_split images for validation, made at upload (the images name no "
        "validation or test split); own: the images' split fields; unknown: recorded without one",
        examples=["drawn"],
    )
    val_split: float | None = Field(None, examples=[0.2])
    split_seed: int | None = Field(None, examples=[0])
    train: int | None = Field(None, description="training images (null when unknown)", examples=[130])
    val: int | None = Field(None, description="validation images", examples=[33])
    test: int | None = Field(None, description="held-out images (never trained on, never validated on)", examples=[0])


class Dataset(_Open):
    id: str = Field(..., examples=["ds_3f2a9c1b0d4e5f67"])
    name: str = Field(..., examples=["raccoon"])
    classes: list[str] = Field(..., examples=[["raccoon"]])
    num_images: int = Field(..., examples=[200])
    num_boxes: int = Field(..., examples=[217])
    splits: dict[str, int] = Field(..., description="images per split ({} when the dataset has none)",
                                   examples=[{"train": 160, "val": 40}])  # fmt: skip
    split: DatasetSplit | None = Field(None, description="the split every job on the data set uses")
    format: str | None = Field(None, description="what was uploaded: coco or voc", examples=["voc"])
    created_at: str | None = Field(None, examples=["2026-11-01T12:00:00+00:00"])


class Architecture(_Open):
    """What ``distill.ckpt_layout`` inferred from an upload's tensor shapes (no code was run).

    A ``detector`` can be a teacher or a student's initial weights; a ``backbone`` (a ResNet state dict)
    only the latter. Fields marked "detector" are absent for a backbone, and ``layout`` for a detector.
    """

    kind: Literal["detector", "backbone"] = Field("detector", examples=["detector"])
    name: str | None = Field(..., description="a known architecture name, or null if none matches",
                             examples=["gfl_r18"])  # fmt: skip
    depth: int | None = Field(..., examples=[18])
    base_width: int | None = Field(..., examples=[64])
    channels: int | None = Field(None, description="detector: FPN and head channels", examples=[256])
    stacked_convs: int | None = Field(None, description="detector", examples=[4])
    num_classes: int | None = Field(None, description="detector", examples=[80])
    reg_max: int | None = Field(None, description="detector", examples=[16])
    strides: list[int] | None = Field(None, description="detector", examples=[[8, 16, 32, 64, 128]])
    classes: list[str] | None = Field(None, description="detector: class names, when the file names them")
    source: Literal["mmdetection", "project"] | None = Field(None, description="detector: who wrote it")
    family: str | None = Field(None, description="detector: gfl, gflv2, atss, fcos or retina", examples=["gfl"])
    num_anchors: int | None = Field(None, description="detector: anchors per location (RetinaNet 9)", examples=[1])
    form: Literal["standard"] | None = Field(
        None,
        description="detector: 'standard' for mmdetection's RetinaNet, FCOS or ATSS as trained (one number per "
        "edge, reg_max null): as a teacher its boxes are spread over the student's bins; null: edge distributions",
    )
    options: dict[str, Any] | None = Field(
        None, description="standard detector: what its config text says (style, norm_on_bbox, anchors, input, ...)"
    )
    layout: Literal["torchvision", "mmdetection"] | None = Field(None, description="backbone: key layout")
    num_params: int = Field(..., examples=[19_000_000])


class Checkpoint(_Open):
    id: str = Field(..., examples=["ckpt_0a1b2c3d4e5f6789"])
    name: str | None = Field(None, examples=["gfl_r101_fpn_mstrain_2x_coco.pth"])
    arch: Architecture
    created_at: str | None = None


class Progress(_Open):
    phase: str | None = Field(None, examples=["train"])
    epoch: int | None = Field(None, examples=[3])
    epochs: int | None = Field(None, examples=[12])
    iter: int | None = Field(None, examples=[240])
    total_iters: int | None = Field(None, examples=[960])
    losses: dict[str, float] | None = Field(None, examples=[{"loss_cls": 0.41, "loss_ld": 0.12}])
    images_per_s: float | None = None
    eta_s: float | None = Field(None, examples=[310.5])


# The store's job states (core.store.JOB_STATES), spelled out for OpenAPI.
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Job(_Open):
    id: str = Field(..., examples=["job_5e6f7a8b9c0d1e2f"])
    kind: Literal["train", "distill", "export"]  # export: a checkpoint published as it is (POST /v1/models)
    name: str | None = None
    state: JobState
    spec: dict[str, Any] = Field(..., description="the validated job spec, defaults filled in")
    progress: Progress | None = None
    metrics: dict[str, Any] | None = Field(None, examples=[{"bbox": {"AP": 0.412, "AP50": 0.61, "AP75": 0.44}}])
    error: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    model_id: str | None = Field(None, description="the published model, once succeeded",
                                 examples=["mdl_5e6f7a8b9c0d1e2f"])  # fmt: skip
    study_id: str | None = Field(None, description="the study this job belongs to (POST /v1/studies), if any")
    queue: str | None = Field(None, description="the broker queue of its size: gpu, or gpu.N for schedule.gpus = N; "
                             "only a worker with N slots (LDD_WORKER_GPUS) takes it", examples=["gpu.2"])  # fmt: skip
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str | None = None


class HistoryRecord(_Open):
    """One progress record as the worker relayed it (``Progress``'s fields), with the attempt that sent it."""

    phase: str | None = Field(None, examples=["train"])
    iter: int | None = Field(None, examples=[240])
    epoch: int | None = Field(None, examples=[3])
    losses: dict[str, Any] | None = Field(None, examples=[{"loss_cls": 0.41, "loss_ld": 0.12}])
    lr: float | None = Field(None, description="the learning rate, when the trainer reports it", examples=[0.01])
    time: float | None = Field(None, description="when the trainer wrote it (Unix seconds)")
    attempt: int = Field(..., examples=[1])
    recorded_at: str | None = Field(None, examples=["2026-11-01T12:00:00+00:00"])


class Evaluation(BaseModel):
    iter: int | None = Field(None, examples=[960])
    attempt: int = Field(..., examples=[1])
    bbox: dict[str, Any] = Field(..., examples=[{"AP": 0.412, "AP50": 0.61, "AP75": 0.44}])


class JobHistory(BaseModel):
    job_id: str = Field(..., examples=["job_5e6f7a8b9c0d1e2f"])
    records: list[HistoryRecord]
    evaluations: list[Evaluation]


class JobList(BaseModel):
    jobs: list[Job]


class DatasetList(BaseModel):
    datasets: list[Dataset]


class Model(_Open):
    # The worker names a job's model after the job: mdl_<the job id's hex>.
    id: str = Field(..., examples=["mdl_5e6f7a8b9c0d1e2f"])
    job_id: str | None = Field(None, examples=["job_5e6f7a8b9c0d1e2f"])
    arch: str | None = Field(None, examples=["gfl_r18"])
    classes: list[str] | None = Field(None, examples=[["raccoon"]])
    input_size: Any = Field(None, examples=[[512, 320]])
    format: str | None = Field(None, description="fp32, int8, fp16 or bf16 (bf16 records its cpu_features)",
                               examples=["int8"])  # fmt: skip
    fp32_id: str | None = Field(
        None,
        description="an int8 or fp16 model's fp32 sibling (same job, same weights)",
        examples=["mdl_5e6f7a8b9c0d1e2f"],
    )
    metrics: dict[str, Any] | None = Field(
        None,
        description="COCO AP, AP50, ... (0-1) on the job's validation split, measured by the runtime that "
        "serves the model (backend, providers); without a data set, the checkpoint's own",
        examples=[
            {"AP": 0.412, "AP50": 0.803, "images": 73, "backend": "onnxruntime", "providers": ["CPUExecutionProvider"]}
        ],
    )
    accuracy_warning: dict[str, Any] | None = Field(
        None, description="set when this format loses more than 1.5 AP against fp32 (still published)"
    )
    serving: dict[str, Any] | None = Field(
        None,
        description="the backend and providers that serve it in this API process (GET /v1/models/{id})",
        examples=[{"backend": "onnxruntime", "providers": ["CPUExecutionProvider"], "loaded": True}],
    )
    sha256: str | None = None
    created_at: str | None = None


class ModelList(BaseModel):
    models: list[Model]


class Detection(BaseModel):
    box: list[float] = Field(..., description="x1, y1, x2, y2 in the original image's pixels",
                             examples=[[12.5, 30.0, 210.2, 190.7]])  # fmt: skip
    score: float = Field(..., examples=[0.87])
    label: int = Field(..., examples=[0])
    class_name: str = Field(..., examples=["raccoon"])


class DetectResponse(BaseModel):
    model: str = Field(..., description="the model that answered", examples=["mdl_5e6f7a8b9c0d1e2f"])
    image_size: list[int] = Field(..., description="width, height", examples=[[650, 417]])
    detections: list[Detection]
    latency_ms: float = Field(..., description="time spent in the server for this request", examples=[14.2])


# A 1x1 PNG: the documented example is a request that works.
TINY_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="


class DetectJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., description="the image file's bytes, base64", examples=[TINY_PNG_B64])
    model: str | None = Field(None, description="model id; /detect uses the newest model when absent")
    score_threshold: float | None = Field(None, ge=0, le=1, examples=[0.3])


class Health(BaseModel):
    status: str = Field(..., examples=["ok"])
    checks: dict[str, Any] = Field(default_factory=dict)

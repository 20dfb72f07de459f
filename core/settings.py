"""Service settings: one typed object read from ``LDD_*`` environment variables (torch-free; the API imports it).

Artifact layout: the storage keys (``core.artifacts``), which are also the paths under ``data_dir`` when no
object storage is set (``LDD_STORAGE_URL`` empty)::

    datasets/<id>/          uploaded dataset folders (annotations.json + images)
    checkpoints/<id>.pt     uploaded checkpoints (teachers, initialisations)
    runs/<job_id>/          one training run: spec.json, checkpoints/, progress.json, model.pt, ...
    models/<model_id>/      published ONNX models (the deploy Registry root)

Local only, under ``data_dir``: ``broker/`` (the embedded Celery broker's folders), ``cache/`` (with object
storage: this machine's verified copies of stored objects) and ``runs/`` (with object storage: the runs this
worker trains, on local disk, uploaded at every checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "LDD_"
EMBEDDED_BROKER = "filesystem://"


def _whole_number(value: Any) -> Any:
    # Limits are often written in exponent form ("40e6"), which pydantic's int refuses.
    return int(float(value)) if isinstance(value, str) else value


Count = Annotated[int, BeforeValidator(_whole_number)]


class Settings(BaseSettings):
    """``Settings()`` reads ``LDD_<FIELD>`` (e.g. ``LDD_DATA_DIR``); keyword arguments win over the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid")

    data_dir: Path = Path("./.ldd")
    # Empty means "sqlite in data_dir" (see _derive).
    store_url: str = ""
    # ``filesystem://`` (the default) is Celery/kombu's filesystem transport with its folders under
    # data_dir, so one machine needs nothing installed; ``redis://host:port/db`` in production.
    broker_url: str = EMBEDDED_BROKER
    # ``LDD_API_KEYS=team-a:KEY1,team-b:KEY2`` (comma-separated, not JSON); a key without ``name:`` is its own
    # tenant. ``LDD_ADMIN_KEYS`` (same form) see every tenant's resources. No key at all: open, one tenant.
    api_keys: Annotated[list[str], NoDecode] = []
    admin_keys: Annotated[list[str], NoDecode] = []
    max_active_jobs: Count = 0  # queued + running jobs per tenant; 0 = no limit
    # Writes (uploads, checkpoints, exports) refuse to leave less than this free in data_dir; 0 = no check.
    min_free_bytes: Count = 0
    max_upload_bytes: Count = 500 * 1024 * 1024
    max_image_pixels: Count = 40_000_000
    # An upload with more damaged (undecodable) image files than this share is refused; fewer are dropped.
    max_bad_image_fraction: float = Field(0.05, ge=0, le=1)
    max_attempts: Count = 3
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    progress_seconds: float = 2.0  # how often the worker relays progress.json into the store
    kill_grace_seconds: float = 5.0  # SIGTERM -> SIGKILL grace when a job is cancelled
    recover_seconds: float = 0.0  # period of the recovery loop; 0 = lease_seconds / 2
    # An idle worker with messages waiting this long has a stuck consumer and restarts (worker.hooks); 0: never.
    consumer_stall_seconds: float = 60.0
    # The processes one job may run on this worker (``schedule.gpus``): it takes jobs of up to this many
    # (``core.routing``). 0 = detect: the GPUs it sees (CUDA_VISIBLE_DEVICES, else nvidia-smi), or its CPU
    # cores when it sees none (gloo).
    worker_gpus: Count = Field(0, ge=0)
    # Where torchvision's ImageNet weights are cached for the service; None = torchvision's own default
    # (``$TORCH_HOME/hub/checkpoints``).
    weights_dir: Path | None = None
    # The runtime that serves models (``deploy.backends``) and measures each exported format's AP: ONNX
    # Runtime, or OpenVINO (the ``openvino`` extra) reading the same ONNX.
    backend: Literal["onnxruntime", "openvino"] = "onnxruntime"
    # ONNX Runtime execution providers, best first (``LDD_PROVIDERS=tensorrt,cuda,cpu``; short or full names);
    # empty: CUDA when this onnxruntime build has it, then CPU. Ones the build lacks are skipped.
    providers: Annotated[list[str], NoDecode] = []
    # The deployment (``core.deployments``, by name in the caller's tenant) that ``/detect`` serves when no model
    # is named; empty: the caller's newest model.
    default_deployment: str = ""
    # Detect requests one model may hold waiting or running; one more is answered 503 with Retry-After at once
    # (an unbounded queue only turns overload into every client's timeout).
    detect_queue: Count = Field(64, ge=1)
    # Checkpoints kept per ended run, newest first (``core.deletion.prune_checkpoints``); 0 = keep all.
    keep_checkpoints: Count = Field(0, ge=0)
    # Where datasets, uploaded checkpoints, runs and published models live (``core.artifacts``): empty = data_dir
    # itself (one machine); ``s3://bucket/prefix`` = S3-compatible object storage (MinIO, AWS), endpoint and
    # credentials from boto3's standard variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). data_dir then
    # holds this machine's local copies only (``cache/``, ``runs/``), so API and workers need no shared folder.
    storage_url: str = ""
    # Bytes of local copies (``data_dir/cache``) kept with object storage, least recently used evicted; 0 = no limit.
    cache_bytes: Count = Field(0, ge=0)

    @field_validator("api_keys", "admin_keys", "providers", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        # Absolute, so the API, the worker and its children agree whatever their working directory.
        self.data_dir = self.data_dir.absolute()
        if self.weights_dir is not None:
            self.weights_dir = self.weights_dir.absolute()
        if not self.store_url:
            self.store_url = f"sqlite:///{self.data_dir / 'ldd.db'}"
        if not self.broker_url:
            self.broker_url = EMBEDDED_BROKER
        if self.recover_seconds <= 0:
            self.recover_seconds = max(0.5, self.lease_seconds / 2)
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``env`` (default: ``os.environ``); ``overrides`` win.

        With an explicit ``env`` every field is given, from ``env`` or its default, so the variables of
        this process play no part (a child's environment is exactly what it will see).
        """
        if env is None:
            return cls(**overrides)
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            values[name] = raw if raw else field.get_default(call_default_factory=True)
        return cls(**{**values, **overrides})

    def to_env(self) -> dict[str, str]:
        """The ``LDD_*`` variables that reproduce these settings in a child process."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            out[ENV_PREFIX + name.upper()] = ",".join(v) if isinstance(v, list) else "" if v is None else str(v)
        return out

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem:")

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def run_dir(self, job_id: str) -> Path:
        return self.runs_dir / job_id

    def make_dirs(self) -> None:
        # With object storage this machine keeps only its runs and its copies (core.artifacts).
        shared = (self.datasets_dir, self.checkpoints_dir, self.models_dir)
        for d in (self.runs_dir, *((self.cache_dir,) if self.storage_url else shared)):
            d.mkdir(parents=True, exist_ok=True)

"""Service settings, read from ``LDD_*`` environment variables (torch-free; the API imports this).

Artifact layout under ``data_dir``::

    datasets/<id>/          uploaded dataset folders (annotations.json + images)
    checkpoints/<id>.pt     uploaded teacher checkpoints
    runs/<job_id>/          one training run: spec.json, checkpoints/, progress.json, model.pt, ...
    models/<model_id>/      published ONNX models (the deploy Registry root)
    broker/                 the embedded (filesystem) Celery broker's folders
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "LDD_"
EMBEDDED_BROKER = "filesystem://"


@dataclass
class Settings:
    data_dir: Path = Path("./.ldd")
    # Empty means "derived from data_dir" (see __post_init__).
    store_url: str = ""
    # ``filesystem://`` (the default) is Celery/kombu's filesystem transport with its folders under
    # data_dir, so one machine needs nothing installed; ``redis://host:port/db`` in production.
    broker_url: str = EMBEDDED_BROKER
    api_keys: list[str] = field(default_factory=list)
    max_upload_bytes: int = 500 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_attempts: int = 3
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    # Worker-side knobs (not in the design card's list, but settable the same way).
    progress_seconds: float = 2.0  # how often the worker relays progress.json into the store
    kill_grace_seconds: float = 5.0  # SIGTERM -> SIGKILL grace when a job is cancelled
    recover_seconds: float = 0.0  # period of the recovery loop; 0 = lease_seconds / 2

    def __post_init__(self) -> None:
        # Absolute, so the API, the worker and its children agree whatever their working directory.
        self.data_dir = Path(self.data_dir).absolute()
        if not self.store_url:
            self.store_url = f"sqlite:///{self.data_dir / 'ldd.db'}"
        if not self.broker_url:
            self.broker_url = EMBEDDED_BROKER
        if self.recover_seconds <= 0:
            self.recover_seconds = max(0.5, self.lease_seconds / 2)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``LDD_<FIELD>`` variables (e.g. ``LDD_DATA_DIR``); ``overrides`` win."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.name == "api_keys":
                values[f.name] = [k.strip() for k in raw.split(",") if k.strip()]
            elif f.name == "data_dir":
                values[f.name] = Path(raw)
            elif f.name in ("max_upload_bytes", "max_image_pixels", "max_attempts"):
                values[f.name] = int(float(raw))  # accepts "40e6"
            elif f.name in ("store_url", "broker_url"):
                values[f.name] = raw
            else:
                values[f.name] = float(raw)
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The ``LDD_*`` variables that reproduce these settings in a child process."""
        out: dict[str, str] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[ENV_PREFIX + f.name.upper()] = ",".join(v) if isinstance(v, list) else str(v)
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
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def run_dir(self, job_id: str) -> Path:
        return self.runs_dir / job_id

    def make_dirs(self) -> None:
        for d in (self.datasets_dir, self.checkpoints_dir, self.runs_dir, self.models_dir):
            d.mkdir(parents=True, exist_ok=True)

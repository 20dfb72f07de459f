"""The inference engines a predictor can run an exported graph on, behind one small interface. Torch-free.

- ``onnxruntime`` (the default): execution providers chosen by :func:`select_providers` from what this
  onnxruntime build offers (``LDD_PROVIDERS``: e.g. ``tensorrt,cuda,cpu``; default CUDA when present, then CPU).
- ``openvino`` (the optional ``openvino`` extra): reads the same ONNX bytes; on CPUs it is often faster
  than ONNX Runtime on the same graph (``bench/latency.py``).

A session is built from the verified bytes of ``model.onnx`` (``deploy.registry.read_verified``) and
answers ``run(batch, sizes) -> (boxes, scores, labels, num_detections)``; ``backend`` and ``providers`` say
what serves it (the API reports them). ``run`` is safe to call from several threads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from deploy.sigaltstack import kept_sigaltstack

log = logging.getLogger("ldd.deploy")

BACKENDS = ("onnxruntime", "openvino")
DEFAULT_BACKEND = "onnxruntime"
# Short names accepted in LDD_PROVIDERS, in ONNX Runtime's spelling.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
CPU = "CPUExecutionProvider"

Outputs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Session(Protocol):
    backend: str
    providers: list[str]

    def run(self, batch: np.ndarray, sizes: np.ndarray) -> Outputs:
        """``batch (N, 3, H, W)`` float32, ``sizes (N, 2)`` float32 -> ``boxes (N, K, 4)``, ``scores (N, K)``,
        ``labels (N, K)`` int64, ``num_detections (N,)`` int64."""
        ...


def select_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The ONNX Runtime providers to ask for, best first.

    ``requested`` (``LDD_PROVIDERS``): short names (``tensorrt``, ``cuda``, ``cpu``, ...) or full provider
    names, in order of preference. Ones this build lacks are skipped with a log line (a GPU image and a CPU
    image read the same settings); CPU always ends the list, since a GPU provider hands the ops it lacks to
    it. Empty: CUDA when available, then CPU (TensorRT only when asked for: building its engines takes
    minutes on first use). An unknown name raises ``ValueError``.
    """
    wanted = [PROVIDER_NAMES.get(p.strip().lower(), p.strip()) for p in (requested or []) if p.strip()]
    unknown = [p for p in wanted if p not in PROVIDER_NAMES.values()]
    if unknown:
        raise ValueError(f"unknown ONNX Runtime provider(s) {unknown}; known: {', '.join(PROVIDER_NAMES)}")
    default = not wanted
    if default:
        wanted = ["CUDAExecutionProvider"]
    chosen = []
    for p in wanted:
        if p in available and p not in chosen:
            chosen.append(p)
        elif p not in available and not default:
            log.warning(
                "ONNX Runtime provider %s is not available in this build (%s); skipped", p, ", ".join(available)
            )
    return [p for p in chosen if p != CPU] + [CPU]


class OrtSession:
    """An ONNX Runtime session over the graph's bytes."""

    backend = "onnxruntime"

    def __init__(
        self,
        data: bytes,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        session_config: Mapping[str, str] | None = None,
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads:
            options.inter_op_num_threads = inter_op_threads
        for key, value in (session_config or {}).items():  # e.g. {"session.intra_op.allow_spinning": "0"}
            options.add_session_config_entry(key, value)
        if providers is None or not all(p in ort.get_available_providers() for p in providers):
            providers = select_providers(providers, ort.get_available_providers())
        self.session = ort.InferenceSession(data, sess_options=options, providers=list(providers))
        self.providers: list[str] = self.session.get_providers()

    def run(self, batch: np.ndarray, sizes: np.ndarray) -> Outputs:
        boxes, scores, labels, num = self.session.run(None, {"images": batch, "image_sizes": sizes})
        return boxes, scores, labels, num


class OpenVinoSession:
    """An OpenVINO compiled model over the same ONNX bytes (``device``: ``CPU``, or ``GPU`` where present)."""

    backend = "openvino"

    def __init__(self, data: bytes, *, device: str = "CPU", threads: int | None = None, precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError:
            raise ValueError("LDD_BACKEND=openvino needs the openvino package (pip install '.[openvino]')") from None
        core = ov.Core()
        # f32: on CPUs with AMX or avx512_bf16 OpenVINO would otherwise run fp32 graphs in bf16, and the
        # detections (and the AP measured at export) would not be those of the published model.
        # A bf16 model (deploy.precision) asks for bf16 here, explicitly.
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        # The plugin swaps this thread's alternate signal stack for one of its own (deploy.sigaltstack).
        with kept_sigaltstack():
            self.compiled = core.compile_model(core.read_model(data), device, config)
        self.providers = [f"openvino-{device}"]
        self._outputs = [self.compiled.output(name) for name in ("boxes", "scores", "labels", "num_detections")]

    def __del__(self) -> None:
        # Destroying the compiled model puts back the stack the plugin replaced; keep ours instead.
        with kept_sigaltstack():
            self._outputs = []
            self.compiled = None

    def run(self, batch: np.ndarray, sizes: np.ndarray) -> Outputs:
        # One infer request per call: requests are not thread-safe, the compiled model is.
        request = self.compiled.create_infer_request()
        result = request.infer({"images": batch, "image_sizes": sizes})
        # Copies: the arrays would otherwise view the request's own buffers, freed with the request.
        boxes, scores, labels, num = (np.array(result[o], copy=True) for o in self._outputs)
        return boxes, scores, labels.astype(np.int64, copy=False), num.astype(np.int64, copy=False)


def make_session(
    data: bytes,
    *,
    backend: str = DEFAULT_BACKEND,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    session_config: Mapping[str, str] | None = None,
    precision: str = "f32",
) -> Session:
    """A session of ``backend`` over the ONNX bytes ``data``. For OpenVINO, ``providers`` may name its
    device (``["GPU"]``); the ONNX Runtime session options do not apply to it."""
    if backend == "onnxruntime":
        return OrtSession(
            data,
            providers=providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            session_config=session_config,
        )
    if backend == "openvino":
        device = next((p for p in providers or [] if p.upper() in ("CPU", "GPU", "NPU", "AUTO")), "CPU")
        return OpenVinoSession(data, device=device.upper(), threads=intra_op_threads, precision=precision)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")

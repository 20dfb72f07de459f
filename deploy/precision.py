"""Inference precisions that depend on the CPU, and the check that refuses them where the CPU lacks them.
Torch-free.

``bf16`` is the fp32 ONNX graph run by OpenVINO with ``INFERENCE_PRECISION_HINT: bf16``: on a CPU with
``avx512_bf16`` (and AMX where present) its convolutions run in bfloat16, about twice as fast as fp32. On a CPU
without those instructions OpenVINO would emulate them, slower than fp32, so a server there refuses to load a bf16
model and says why, rather than serving it slowly. The features a format needs are recorded in its model.json
(``cpu_features``) when it is exported, so the check needs nothing but the file and this machine's flags.
"""

from __future__ import annotations

from functools import cache
from typing import Any

# The CPU flags (as /proc/cpuinfo names them) a precision needs, all of them.
CPU_FEATURES: dict[str, tuple[str, ...]] = {"bf16": ("avx512_bf16",)}
# The OpenVINO inference precision of each precision that is not the graph's own.
OPENVINO_PRECISION = {"bf16": "bf16"}


class PrecisionUnavailable(RuntimeError):
    """This machine's CPU lacks what a model's precision needs."""


@cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def check_cpu(meta: dict[str, Any], flags: frozenset[str] | None = None) -> None:
    """Raise :class:`PrecisionUnavailable` when model.json ``meta`` records CPU features this CPU lacks."""
    needed = list(meta.get("cpu_features") or [])
    have = cpu_flags() if flags is None else flags
    if missing := [f for f in needed if f not in have]:
        raise PrecisionUnavailable(
            f"this model's precision {meta.get('precision', '?')} needs the CPU features {needed}; this CPU lacks "
            f"{missing}, and emulating them would be slower than fp32: serve its fp32 model instead"
        )

"""The teacher check: what makes distillation from a teacher meaningless, refused before any step."""

from __future__ import annotations

from distill.models.gfl import GFL
from distill.pairing import pair_problems
from distill.spec import DistillSpec


class TeacherMismatch(ValueError):
    pass


def model_facts(model: GFL) -> dict:
    """The facts :func:`distill.pairing.pair_problems` compares, of a built detector."""
    return {
        "family": model.family,
        "reg_max": model.reg_max,
        "strides": list(model.strides),
        "num_anchors": model.num_anchors,
        "form": "standard" if getattr(model, "hard_edge_targets", False) else None,
    }


def check_teacher(teacher: GFL, student: GFL, spec: DistillSpec | None = None) -> None:
    """Raises :class:`TeacherMismatch` naming every difference that makes distillation meaningless
    (:func:`distill.pairing.pair_problems`): the edge distributions must have the same bins (``reg_max``), the
    locations the same strides, the anchors per location a matching rule, and the job's method (``spec``)
    must run on the pair. The families and classes may differ: LD needs no class, KD maps them
    (:func:`distill.class_map.map_classes`)."""
    weight = spec.weights.value if spec is not None else None
    if problems := pair_problems(model_facts(teacher), model_facts(student), weight):
        raise TeacherMismatch("teacher does not match the student: " + "; ".join(problems))

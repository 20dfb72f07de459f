"""Which teacher can distil into which student (DESIGN sections 2 and 3), torch-free: the job check
(``core.checks``, before queueing) and training (:func:`distill.teacher.check_teacher`) ask this one rule.

Any family teaches any other with the same strides and the same edge bins: LD compares edge distributions
bin by bin and location by location, and every family measures edges from the location's centre in stride
units. Anchors per location may differ where :mod:`distill.anchor_match` has a rule (several -> one,
one -> several, equal counts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def pair_problems(
    teacher: Mapping[str, Any], student: Mapping[str, Any], weight: Callable[[str], float] | None = None
) -> list[str]:
    """Every reason this teacher cannot distil into this student (empty when it can).

    Args:
        teacher, student: architecture facts (``distill.ckpt_layout.infer_architecture``'s keys, or
            ``distill.spec.arch_config``'s): ``reg_max``, ``strides``, ``num_anchors``, ``family`` and, for an
            mmdetection standard-form teacher, ``form: "standard"``. A fact that is absent is not compared.
        weight: the job's distillation weight of a term by name (``LossWeights.value``), to refuse a method
            the pair cannot run; None: no method check.
    """
    problems = []
    t_bins, s_bins = teacher.get("reg_max"), student.get("reg_max")
    if t_bins is not None and s_bins is not None and int(t_bins) != int(s_bins):
        problems.append(
            f"reg_max {t_bins} differs from the student's {s_bins}: LD compares edge distributions bin by bin"
        )
    t_strides, s_strides = teacher.get("strides"), student.get("strides")
    if t_strides is not None and s_strides is not None and [int(s) for s in t_strides] != [int(s) for s in s_strides]:
        problems.append(
            f"strides {list(t_strides)} differ from the student's {list(s_strides)}: distillation compares the "
            "two detectors location by location"
        )
    t_anchors, s_anchors = int(teacher.get("num_anchors") or 1), int(student.get("num_anchors") or 1)
    if t_anchors != s_anchors and min(t_anchors, s_anchors) > 1:
        problems.append(
            f"anchors per location differ ({t_anchors} and {s_anchors}): a teacher teaches a student with as many "
            "anchors, with one, or from one"
        )
    crosskd_on = weight is not None and (weight("crosskd_cls") > 0 or weight("crosskd_reg") > 0)
    if crosskd_on and teacher.get("form") == "standard":
        problems.append(
            "CrossKD runs the student's head features through the teacher's head, and a standard-form "
            f"mmdetection {teacher.get('family', '')} head regresses one number per edge, not the edge "
            "distributions CrossKD imitates; use method 'ld' or 'bckd' with this teacher"
        )
    return problems

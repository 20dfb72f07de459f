"""The teacher check: what makes distillation from a teacher meaningless, refused before any step."""

from __future__ import annotations

from distill.models.gfl import GFL


class TeacherMismatch(ValueError):
    pass


def check_teacher(teacher: GFL, student: GFL) -> None:
    """Raises :class:`TeacherMismatch` naming every difference that makes distillation meaningless: the
    edge distributions must have the same bins (``reg_max``) and the locations the same strides. The
    classes may differ: LD needs none, and KD maps them (:func:`distill.class_map.map_classes`)."""
    problems = []
    if teacher.reg_max != student.reg_max:
        problems.append(
            f"reg_max differs (teacher {teacher.reg_max}, student {student.reg_max}): LD compares "
            "edge distributions bin by bin"
        )
    if tuple(teacher.strides) != tuple(student.strides):
        problems.append(f"strides differ (teacher {list(teacher.strides)}, student {list(student.strides)})")
    if problems:
        raise TeacherMismatch("teacher does not match the student: " + "; ".join(problems))

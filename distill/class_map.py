"""Which teacher class teaches each dataset class in classification KD (DESIGN section 3, "Teachers with
other classes"). Torch-free, so the service can check a job's ``distill.class_map`` before queueing it.

LD distils box-edge distributions, which carry no class, so any teacher with the same ``reg_max`` and
strides can teach localization. KD compares class logits, so it needs a correspondence: the job's explicit
``distill.class_map`` (dataset class name -> teacher class name) when given, else the classes whose names
are equal ignoring case. KD then runs on the mapped columns only (student logit ``c`` against teacher logit
``map[c]``); dataset classes without a teacher class get no KD, and with none mapped KD is off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class ClassMapError(ValueError):
    """An explicit class map names a class that the dataset or the teacher does not have."""


@dataclass(frozen=True)
class ClassMap:
    student: tuple[int, ...]  # dataset class indices that have a teacher class, in dataset order
    teacher: tuple[int, ...]  # the teacher class index for each of them (may repeat: two classes, one teacher)
    names: dict[str, str]  # dataset class name -> teacher class name, for the mapped classes
    unmapped: tuple[str, ...]  # dataset classes without a teacher class: no KD for them
    source: str  # "class_map" (the job's explicit map) or "name" (equal names, case-insensitive)
    identity: bool  # every class maps onto the teacher's same column: no column selection is needed

    @property
    def kd_possible(self) -> bool:
        return bool(self.student)

    def report(self, kd_weighted: bool = True) -> dict:
        """What the job's ``metrics.json`` records: the mapping used, the unmapped dataset classes and
        whether KD ran (``kd_weighted``: whether any KD weight is above 0)."""
        kd = (
            "on"
            if self.kd_possible and kd_weighted
            else ("off (no class in common)" if not self.kd_possible else "off (weight 0)")
        )
        return {"mapping": dict(self.names), "unmapped": list(self.unmapped), "by": self.source, "kd": kd}


def map_classes(dataset: Sequence[str], teacher: Sequence[str], explicit: dict[str, str] | None = None) -> ClassMap:
    """The KD class correspondence of a dataset's classes with a teacher's (both in logit order).

    With ``explicit`` (the job's ``distill.class_map``), exactly its pairs, names spelt exactly (it is the
    way to say precisely what maps); raises :class:`ClassMapError` naming every unknown class. Without it,
    each dataset class maps to the first teacher class of the same name ignoring case.
    """
    if explicit is not None:
        pairs, problems = [], []
        for d_name, t_name in explicit.items():
            d = list(dataset).index(d_name) if d_name in dataset else None
            t = list(teacher).index(t_name) if t_name in teacher else None
            if d is None:
                problems.append(f"{d_name!r} is not a dataset class (dataset classes: {_listing(dataset)})")
            if t is None:
                problems.append(f"{t_name!r} is not a teacher class (teacher classes: {_listing(teacher)})")
            if d is not None and t is not None:
                pairs.append((d, t))
        if problems:
            raise ClassMapError("distill.class_map: " + "; ".join(problems))
        pairs.sort()
        source = "class_map"
    else:
        first: dict[str, int] = {}
        for i, name in enumerate(teacher):
            first.setdefault(name.casefold(), i)
        pairs = [(d, first[name.casefold()]) for d, name in enumerate(dataset) if name.casefold() in first]
        source = "name"
    mapped = {d for d, _ in pairs}
    return ClassMap(
        student=tuple(d for d, _ in pairs),
        teacher=tuple(t for _, t in pairs),
        names={dataset[d]: teacher[t] for d, t in pairs},
        unmapped=tuple(name for d, name in enumerate(dataset) if d not in mapped),
        source=source,
        identity=len(dataset) == len(teacher) and all(d == t for d, t in pairs) and len(pairs) == len(dataset),
    )


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")

"""Teachers and students with a different number of anchors per location (DESIGN section 2: "any family
teaches any other with the same strides").

Every family measures an anchor's four edges from its location's centre in stride units, and the anchors of
one location share that centre, so an edge distribution of one family is comparable bin for bin with any
other's at the same location. Only the number of rows per location differs (RetinaNet 9, the others 1).
The rule, per location:

- same count (1 -> 1, 9 -> 9): anchor ``a`` of the teacher teaches anchor ``a`` of the student;
- several -> one (RetinaNet teaching FCOS, say): the student's anchor learns the teacher's anchor whose
  largest class probability is highest there, the one the teacher would itself rank first at that place;
- one -> several (ATSS teaching RetinaNet): every student anchor at a location learns the teacher's single
  anchor there;
- other counts (several -> a different several) are refused: no family has them.

The rows are ``(B, L*A, ...)``, levels concatenated and anchor-minor within a location (``index = location *
A + a``, as ``Detector.flatten`` gives them).
"""

from __future__ import annotations

from torch import Tensor


def match_anchors(score: Tensor, rows: list[Tensor], a_from: int, a_to: int) -> list[Tensor]:
    """``rows`` (each ``(B, L*a_from, ...)``) rearranged to ``(B, L*a_to, ...)`` by the rule above.

    Args:
        score: ``(B, L*a_from)`` each row's largest class probability (it picks the teacher's anchor when
            ``a_from > 1 = a_to``).
        rows: tensors whose dim 1 runs over the ``L*a_from`` anchors.
        a_from, a_to: anchors per location on the teacher's and on the student's side.
    """
    if a_from == a_to:
        return rows
    b, n = score.shape
    locations = n // a_from
    if a_from == 1:
        return [r.repeat_interleave(a_to, dim=1) for r in rows]
    if a_to == 1:
        best = score.reshape(b, locations, a_from).argmax(-1)  # (B, L)
        index = best + a_from * best.new_tensor(range(locations))[None]  # (B, L) rows of the chosen anchors
        out = []
        for r in rows:
            idx = index.reshape(b, locations, *([1] * (r.dim() - 2))).expand(b, locations, *r.shape[2:])
            out.append(r.gather(1, idx))
        return out
    raise ValueError(f"no rule to match {a_from} anchors per location with {a_to}")

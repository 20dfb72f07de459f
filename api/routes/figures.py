"""Pictures of a job's run that people would rather look at than read: the paper's figure 5 (where on an image
the student's box logits are far from the teacher's, before and after distillation)."""

from __future__ import annotations

import io

from fastapi import APIRouter
from fastapi.responses import Response

from api.deps import ArtifactsDep, CallerDep, ResourceId, StoreDep, get_or_404
from api.errors import APIError, error_docs
from api.routes.datasets import published_annotations
from deploy.draw import draw_error_maps

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/figure5.png",
    summary="Figure 5 of the paper for a distillation job: box-logit error maps at P5 and P6 (PNG)",
    description=(
        "Per location of the P5 and P6 levels, the L1 error between the student's and the teacher's box logits "
        "(log-softmax per edge, summed over the bins and the four edges), on the first validation image, for "
        "the student before distillation (top) and after it (bottom); each column shares one colour scale. "
        "404 for a job that is not a finished distillation, or that ran before figure 5 was recorded."
    ),
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **error_docs(404)},
)
def job_figure5(job_id: ResourceId, store: StoreDep, artifacts: ArtifactsDep, caller: CallerDep) -> Response:
    job = get_or_404(store.get_job, "job", job_id, caller.scope)
    figure = ((job.get("metrics") or {}).get("diagnostics") or {}).get("figure5")
    if not figure or not figure.get("before") or not figure.get("after"):
        raise APIError(404, "not_found", f"job {job_id} has no figure 5 (only finished distillation jobs have it)")
    dataset = get_or_404(store.get_dataset, "dataset", job["spec"]["dataset"], caller.scope)
    data = published_annotations(artifacts.tree(dataset["key"]))
    image = data.image(int(figure["after"]["image_id"]))
    buf = io.BytesIO()
    draw_error_maps(image["path"], figure).save(buf, "PNG")
    # A finished job's metrics never change: the browser may keep the picture.
    return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

"""``/ui``: the web dashboard. Static HTML, CSS and JS shipped in the ``api`` package (``api/static``), with no
build step; the page talks to the same REST API as any client (``/v1/...``), sending the API key the user typed
when the service has keys. The page itself needs no key: it holds no data, only the code that asks for it."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def ui_page() -> FileResponse:
    # no-cache: a browser revalidates (ETag), so an upgraded service never runs yesterday's script.
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/")
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=308)


def mount_static(app: FastAPI) -> None:
    """Serve ``api/static`` under ``/ui/static`` (the page's script, styles and chart library)."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

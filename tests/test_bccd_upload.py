"""BCCD (shared/data/bccd-voc) uploaded as a VOC zip over real HTTP: its two point boxes are reported by file
name and dropped, and its splits come from ``ImageSets/Main``.

To keep the test fast, the zip holds every fifth photo and the two with point boxes (75 of 364), their XML
files, and the four ``ImageSets/Main`` lists filtered to them, as a user's subset of the set would be. The API
is the uvicorn subprocess ``ldd up`` runs (``api.app:create_app``), in its embedded mode, with torch blocked.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import ApiServer
from tests.shared_data import needs_shared, shared_path

BCCD = shared_path("data/bccd-voc")
pytestmark = needs_shared("data/bccd-voc")

# xmin == xmax and ymin == ymax in these two files (object index, class, corners).
POINT_BOXES = {
    "BloodImage_00338.xml": "object 12 (RBC 504,337,504,337)",
    "BloodImage_00343.xml": "object 3 (RBC 181,329,181,329)",
}


def _stems() -> set[str]:
    every_fifth = {p.stem for p in sorted((BCCD / "Annotations").glob("*.xml"))[::5]}
    return every_fifth | {Path(name).stem for name in POINT_BOXES}


def _ids(name: str) -> list[str]:
    """The ids of ``ImageSets/Main/<name>.txt`` that the zip holds, in the list's order."""
    keep = _stems()
    return [i for i in (BCCD / f"ImageSets/Main/{name}.txt").read_text().split() if i in keep]


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("bccd_upload")
    server = ApiServer({"LDD_DATA_DIR": str(work / "data"), "LDD_MAX_UPLOAD_BYTES": str(64 << 20)}, work).start()
    try:
        archive = work / "bccd.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not compress
            for stem in sorted(_stems()):
                zf.write(BCCD / f"Annotations/{stem}.xml", f"bccd/Annotations/{stem}.xml")
                zf.write(BCCD / f"JPEGImages/{stem}.jpg", f"bccd/JPEGImages/{stem}.jpg")
            for name in ("train", "val", "trainval", "test"):
                zf.writestr(f"bccd/ImageSets/Main/{name}.txt", "".join(f"{i}\n" for i in _ids(name)))
        with httpx.Client(base_url=server.url, timeout=120) as http, open(archive, "rb") as f:
            r = http.post("/v1/datasets", files={"file": ("bccd.zip", f, "application/zip")}, data={"name": "bccd"})
            assert r.status_code == 201, r.text
            body = r.json()
            listed = http.get(f"/v1/datasets/{body['id']}").json()
        yield body, listed, work / "data/datasets" / body["id"]
    finally:
        server.stop()


def test_point_boxes_reported_by_file_and_dropped(uploaded: Any) -> None:
    body, listed, folder = uploaded
    assert body["format"] == "voc" and body["classes"] == ["Platelets", "RBC", "WBC"]
    assert len(body["problems"]) == 2, body["problems"]
    for file_name, box in POINT_BOXES.items():
        hits = [p for p in body["problems"] if file_name in p]
        assert len(hits) == 1 and box in hits[0] and "point" in hits[0] and "dropped" in hits[0], body["problems"]
    assert listed["problems"] == body["problems"]  # stored with the dataset, not only in the answer
    # Every box of the XML files but the two points; no box without extent is left.
    in_xml = sum((BCCD / f"Annotations/{stem}.xml").read_text().count("<object>") for stem in _stems())
    assert body["num_images"] == len(_stems()) == 75 and body["num_boxes"] == in_xml - 2
    coco = json.loads((folder / "annotations.json").read_text())
    assert len(coco["annotations"]) == in_xml - 2
    assert min(min(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]) > 1


def test_splits_come_from_imagesets(uploaded: Any) -> None:
    body, listed, folder = uploaded
    counts = {name: len(_ids(name)) for name in ("train", "val", "test")}
    assert sum(counts.values()) == 75 and min(counts.values()) >= 10
    assert body["splits"] == listed["splits"] == counts
    coco = json.loads((folder / "annotations.json").read_text())
    split_of = {Path(im["file_name"]).stem: im["split"] for im in coco["images"]}
    for name in ("train", "val", "test"):
        assert {stem for stem, s in split_of.items() if s == name} == set(_ids(name))
    # trainval is the union of train and val: beside them it gives no split of its own.
    assert set(_ids("trainval")) == set(_ids("train")) | set(_ids("val"))
    assert split_of["BloodImage_00338"] == "val" and split_of["BloodImage_00343"] == "train"

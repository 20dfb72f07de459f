"""No REST field names a path on the server (DESIGN sections 4 and 5), over real HTTP: every form of a path
in a job is refused with a 4xx and nothing is stored; ImageNet initialisation is refused when the weights
are neither cached nor reachable, naming the file and the folder; uploads are referred to by id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import api_server
from tests.api_server import ApiServer, serve_api

# The shared client and uploaded data set, on this module's own (offline) server.
http, dataset = api_server.http, api_server.dataset


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("api_paths")
    # Offline, as a machine without internet is: connections go to a proxy that refuses them.
    srv = serve_api(
        work, LDD_WEIGHTS_DIR=str(work / "weights"), HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9"
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def checkpoint(server: ApiServer, http: httpx.Client) -> dict[str, Any]:
    pytest.importorskip("torch")
    from distill.checkpoint import atomic_save, build_detector, detector_state

    path = server.work / "teacher.pt"  # type: ignore[attr-defined]
    atomic_save(detector_state(build_detector("gfl_tiny", 2, ["a", "b"])), path)
    with open(path, "rb") as f:
        r = http.post("/v1/checkpoints", files={"file": ("teacher.pt", f)})
    assert r.status_code == 201, r.text
    return r.json()


def _stored(server: ApiServer, http: httpx.Client) -> tuple[Any, ...]:
    data_dir: Path = server.data_dir  # type: ignore[attr-defined]
    return (
        sorted(j["id"] for j in http.get("/v1/jobs").json()["jobs"]),
        sorted(p.name for p in (data_dir / "runs").iterdir()),
    )


def test_every_server_path_form_is_refused_and_nothing_stored(
    server: ApiServer, http: httpx.Client, dataset: dict[str, Any], checkpoint: dict[str, Any]
) -> None:
    ds, ck = dataset["id"], checkpoint["id"]
    data_dir: Path = server.data_dir  # type: ignore[attr-defined]
    own_file = str(data_dir / "checkpoints" / f"{ck}.pt")  # a real file in the service's own data folder
    train = {"kind": "train", "dataset": ds, "schedule": {"epochs": 1}}
    distill = {"kind": "distill", "dataset": ds, "student": {"arch": "gfl_tiny"}}

    def student(**fields: Any) -> dict[str, Any]:
        return {**train, "student": {"arch": "gfl_tiny", **fields}}

    forms: list[tuple[str, dict[str, Any]]] = [
        ("pretrained as a path (the old field)", student(pretrained="/etc/passwd")),
        ("init as a path string", student(init="/etc/passwd")),
        ("init {'path': ...}", student(init={"path": "/etc/passwd"})),
        ("init checkpoint as a path", student(init={"checkpoint": "/etc/passwd"})),
        ("init path into the data folder", student(init=own_file)),
        ("init checkpoint id with ../", student(init={"checkpoint": f"../checkpoints/{ck}"})),
        ("teacher {'path': ...}", {**distill, "teacher": {"path": "/etc/passwd"}}),
        ("teacher path into the data folder", {**distill, "teacher": {"path": own_file}}),
        ("teacher checkpoint as a path", {**distill, "teacher": {"checkpoint": own_file}}),
        ("dataset as a folder", {**train, "dataset": "/work/shared/data/raccoon-voc"}),
        ("dataset folder inside the data folder", {**train, "dataset": str(data_dir / "datasets" / ds)}),
    ]
    before = _stored(server, http)
    for what, body in forms:
        r = http.post("/v1/jobs", json=body)
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert r.json()["error"]["code"] == "invalid_request", (what, r.text)
    assert _stored(server, http) == before
    # The same bodies with ids instead are accepted: the refusals are about paths, not about the jobs.
    ok = http.post("/v1/jobs", json={**train, "student": {"arch": "gfl_tiny", "init": {"checkpoint": ck}}})
    assert ok.status_code == 202, ok.text
    ok = http.post("/v1/jobs", json={**distill, "teacher": {"checkpoint": ck}})
    assert ok.status_code == 202, ok.text
    assert (
        ok.json()["spec"]["teacher"] == {"checkpoint": ck, "model": None, "job": None}
        or ok.json()["spec"]["teacher"]["checkpoint"] == ck
    )


def test_imagenet_without_cached_weights_is_refused_naming_file_and_folder(
    server: ApiServer, http: httpx.Client, dataset: dict[str, Any]
) -> None:
    body = {"kind": "train", "dataset": dataset["id"], "student": {"arch": "gfl_r18", "init": "imagenet"}}
    before = _stored(server, http)
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    weights: Path = server.work / "weights"  # type: ignore[attr-defined]
    assert err["code"] == "weights_missing"
    assert "resnet18-f37072fd.pth" in err["message"] and str(weights) in err["message"]
    assert _stored(server, http) == before
    # Architectures without ImageNet weights are refused with a reason.
    r = http.post("/v1/jobs", json={**body, "student": {"arch": "gfl_tiny", "init": "imagenet"}})
    assert r.status_code == 422 and "has no ImageNet weights" in r.json()["error"]["message"], r.text
    # Once the file is in the cache folder, the same job is queued.
    weights.mkdir(exist_ok=True)
    (weights / "resnet18-f37072fd.pth").write_bytes(b"placed by an operator")
    assert http.post("/v1/jobs", json=body).status_code == 202


def test_backbone_upload_says_its_kind(server: ApiServer, http: httpx.Client) -> None:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    path = server.work / "resnet18.pth"  # type: ignore[attr-defined]
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with open(path, "rb") as f:
        r = http.post("/v1/checkpoints", files={"file": ("resnet18.pth", f)})
    assert r.status_code == 201, r.text
    arch = r.json()["arch"]
    assert arch["kind"] == "backbone" and arch["depth"] == 18 and arch["layout"] == "torchvision"
    assert "path" not in r.json()

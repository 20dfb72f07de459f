"""Deployments over real HTTP (a uvicorn subprocess without torch, SQLite, ONNX Runtime): two tenants create,
update, roll back and detect through their own ``blood-cells``; an incompatible model is refused with the
reason; ``LDD_DEFAULT_DEPLOYMENT`` makes ``/detect`` serve the name; 200 requests across a switch are each
answered by the old or the new model and none fails.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.api_server import ApiServer, error_of, png_bytes, publish_test_model, serve_api

A, B = {"Authorization": "Bearer KA"}, {"Authorization": "Bearer KB"}


def own(server: Any, model_id: str, tenant: str) -> None:
    """Give a published model to ``tenant`` (as if that tenant's job had made it)."""
    engine = sa.create_engine(server.store_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE models SET tenant = :t WHERE id = :i"), {"t": tenant, "i": model_id})
    engine.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = serve_api(tmp_path_factory.mktemp("deployments"), LDD_API_KEYS="team-a:KA,team-b:KB",
                    LDD_DEFAULT_DEPLOYMENT="blood-cells")  # fmt: skip
    for model_id, classes, tenant in (("mdl_deploy000001", ["a", "b"], "team-a"),
                                      ("mdl_deploy000002", ["a", "b"], "team-a"),
                                      ("mdl_deploy000003", ["a", "b", "c"], "team-a"),
                                      ("mdl_deploy000004", ["a", "b"], "team-b")):  # fmt: skip
        publish_test_model(srv.data_dir, srv.store_url, classes, model_id)  # type: ignore[attr-defined]
        own(srv, model_id, tenant)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: ApiServer) -> Any:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def detect(http: httpx.Client, path: str, headers: dict[str, str]) -> httpx.Response:
    return http.post(path, files={"file": ("x.png", png_bytes((96, 64)), "image/png")}, headers=headers)


def test_create_update_rollback_and_detect_per_tenant(http: httpx.Client) -> None:
    r = http.post("/v1/deployments", json={"name": "blood-cells", "model": "mdl_deploy000001"}, headers=A)
    assert r.status_code == 201, r.text
    dep = r.json()
    assert (dep["version"], dep["model_id"], dep["updated_by"]) == (1, "mdl_deploy000001", "team-a")
    assert [(v["version"], v["model_id"], v["created_by"]) for v in dep["history"]] == [
        (1, "mdl_deploy000001", "team-a")
    ]
    again = http.post("/v1/deployments", json={"name": "blood-cells", "model": "mdl_deploy000002"}, headers=A)
    assert again.status_code == 409 and error_of(again)["code"] == "deployment_exists"

    # Team B: A's deployment and A's model are not there; its own blood-cells is its own.
    assert http.get("/v1/deployments/blood-cells", headers=B).status_code == 404
    assert (
        http.post("/v1/deployments/blood-cells/detect", headers=B, files={"file": ("x.png", png_bytes())}).status_code
        == 404
    )
    stolen = http.post("/v1/deployments", json={"name": "blood-cells", "model": "mdl_deploy000001"}, headers=B)
    assert stolen.status_code == 404
    r = http.post("/v1/deployments", json={"name": "blood-cells", "model": "mdl_deploy000004"}, headers=B)
    assert r.status_code == 201 and r.json()["updated_by"] == "team-b"
    assert http.put("/v1/deployments/blood-cells", json={"model": "mdl_deploy000002"}, headers=B).status_code == 404

    # Other classes: refused with the reason, and nothing changed.
    r = http.put("/v1/deployments/blood-cells", json={"model": "mdl_deploy000003"}, headers=A)
    assert r.status_code == 409 and error_of(r)["code"] == "incompatible_model"
    assert "classes differ" in error_of(r)["message"] and "'c'" in error_of(r)["message"]
    assert http.get("/v1/deployments/blood-cells", headers=A).json()["version"] == 1

    r = http.put("/v1/deployments/blood-cells", json={"model": "mdl_deploy000002"}, headers=A)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["model_id"]) == (2, "mdl_deploy000002")
    assert [v["version"] for v in r.json()["history"]] == [2, 1]
    for path in ("/v1/deployments/blood-cells/detect", "/detect"):  # /detect: LDD_DEFAULT_DEPLOYMENT
        r = detect(http, path, A)
        assert r.json().get("model") == "mdl_deploy000002", r.text
        assert detect(http, path, B).json()["model"] == "mdl_deploy000004", path
    # A named model still wins over the default deployment.
    assert detect(http, "/detect?model=mdl_deploy000001", A).json()["model"] == "mdl_deploy000001"

    r = http.post("/v1/deployments/blood-cells/rollback", headers=A)
    assert r.status_code == 200 and (r.json()["version"], r.json()["model_id"]) == (1, "mdl_deploy000001")
    assert [v["version"] for v in r.json()["history"]] == [2, 1]  # the later version stays in the history
    assert detect(http, "/v1/deployments/blood-cells/detect", A).json()["model"] == "mdl_deploy000001"
    r = http.post("/v1/deployments/blood-cells/rollback", headers=A)
    assert r.status_code == 409 and error_of(r)["code"] == "no_previous_version"
    r = http.put("/v1/deployments/blood-cells", json={"model": "mdl_deploy000002"}, headers=A)
    assert r.json()["version"] == 3  # numbered after the highest, not after the current

    listed = http.get("/v1/deployments", headers=A).json()["deployments"]
    assert [(d["name"], d["tenant"], d["model_id"]) for d in listed] == [("blood-cells", "team-a", "mdl_deploy000002")]
    assert http.delete("/v1/deployments/blood-cells", headers=B).status_code == 204
    assert http.get("/v1/deployments/blood-cells", headers=B).status_code == 404
    assert error_of(detect(http, "/detect", B))["code"] == "no_deployment"
    assert http.get("/v1/deployments/blood-cells", headers=A).json()["version"] == 3
    assert http.get("/v1/deployments", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_two_hundred_requests_across_a_switch_none_fails(http: httpx.Client) -> None:
    http.post("/v1/deployments", json={"name": "switch", "model": "mdl_deploy000001"}, headers=A)
    assert http.get("/v1/deployments/switch", headers=A).json()["model_id"] == "mdl_deploy000001"
    image = png_bytes((96, 64))
    switched: dict[str, float] = {}
    done = threading.Event()

    def one(i: int) -> tuple[float, float, int, str]:
        if i == 60:  # a third of the way in, from one of the clients' own threads
            switched["start"] = time.monotonic()
            r = http.put("/v1/deployments/switch", json={"model": "mdl_deploy000002"}, headers=A)
            assert r.status_code == 200, r.text
            switched["end"] = time.monotonic()
            done.set()
        start = time.monotonic()
        r = http.post("/v1/deployments/switch/detect", files={"file": ("x.png", image, "image/png")}, headers=A)
        return start, time.monotonic(), r.status_code, r.json().get("model", r.text)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(200)))
    assert done.is_set()
    assert [s for _, _, s, _ in results] == [200] * 200
    assert {m for *_, m in results} == {"mdl_deploy000001", "mdl_deploy000002"}
    for start, end, _, m in results:
        if end < switched["start"]:
            assert m == "mdl_deploy000001"
        if start > switched["end"]:
            assert m == "mdl_deploy000002"
    assert sum(start > switched["end"] for start, *_ in results) >= 50


def test_metrics_count_detects_per_deployment_and_model(http: httpx.Client) -> None:
    text = http.get("/metrics").text
    line = 'ldd_detect_requests_total{deployment="switch",model="mdl_deploy000002"}'
    assert any(ln.startswith(line) and float(ln.split()[-1]) >= 50 for ln in text.splitlines()), text[-2000:]
    assert 'ldd_detect_seconds_bucket{deployment="switch",le="+Inf",model="mdl_deploy000001"}' in text


def test_cli_deployments_and_delete(
    server: ApiServer, http: httpx.Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from api.cli import main

    monkeypatch.setenv("LDD_API_KEY", "KA")
    url = ["--url", server.url]
    assert main(["deployments", *url, "create", "cli-cells", "mdl_deploy000001"]) == 0
    assert main(["deployments", *url, "update", "cli-cells", "mdl_deploy000003"]) == 2  # other classes: refused
    assert "incompatible_model" in capsys.readouterr().err
    assert main(["deployments", *url, "update", "cli-cells", "mdl_deploy000002"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2
    assert main(["deployments", *url, "rollback", "cli-cells"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == "mdl_deploy000001"
    assert main(["deployments", *url, "show", "cli-cells"]) == 0
    assert [v["model_id"] for v in json.loads(capsys.readouterr().out)["history"]] == [
        "mdl_deploy000002", "mdl_deploy000001"
    ]  # fmt: skip
    assert main(["deployments", *url, "list"]) == 0
    assert "cli-cells" in capsys.readouterr().out
    image = server.work / "cli.png"  # type: ignore[attr-defined]
    image.write_bytes(png_bytes((96, 64)))
    assert main(["detect", *url, str(image), "--deployment", "cli-cells"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "mdl_deploy000001"
    assert main(["models", *url, "delete", "mdl_deploy000001"]) == 2  # served by cli-cells (and others)
    err = capsys.readouterr().err
    assert "409 in_use" in err and "team-a/cli-cells" in err
    assert main(["deployments", *url, "delete", "cli-cells"]) == 0
    assert main(["deployments", *url, "show", "cli-cells"]) == 2
    assert "404 not_found" in capsys.readouterr().err


def test_incompatibility_names_what_differs() -> None:
    from core.deployments import incompatibility

    def row(id: str, classes: list[str], size: list[int]) -> dict[str, Any]:
        return {"id": id, "meta": {"classes": classes, "input_size": size}}

    a = row("mdl_a", ["rbc", "wbc"], [640, 384])
    assert incompatibility(a, row("mdl_b", ["rbc", "wbc"], [640, 384])) is None
    assert "input size differs" in str(incompatibility(a, row("mdl_c", ["rbc", "wbc"], [512, 320])))
    assert "classes differ" in str(incompatibility(a, row("mdl_d", ["wbc", "rbc"], [640, 384])))  # order is meaning

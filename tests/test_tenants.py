"""Tenants (issue 15): two teams and an admin against one real API server (uvicorn, SQLite, Redis, ONNX Runtime).

Every route: no cross-tenant read, list, cancel, follow, download, detect or reference at submit (another
tenant's id is answered word for word as an id that names nothing), admins see everything, idempotency keys
are per tenant, and ``LDD_MAX_ACTIVE_JOBS`` answers 429. Plus the key parsing and the store's limit under
concurrent submits (SQLite and PostgreSQL).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.store import Store, TooManyActiveJobs
from core.tenants import DEFAULT_TENANT, Caller, key_tenant, parse_keys
from tests.api_server import coco_zip, error_of, png_bytes, publish_test_model, serve_api
from tests.service_fixtures import postgres_database

KEYS = {"a": "key-of-team-a", "b": "key-of-team-b", "admin": "key-of-the-boss"}
LIMIT = 3


def test_key_parsing() -> None:
    assert key_tenant("team-a:K1") == ("team-a", "K1")
    name, key = key_tenant("bare-key")
    assert key == "bare-key" and name.startswith("key-") and "bare" not in name  # the key is not its name
    callers = parse_keys(["team-a:K1", "K2"], ["boss:K3"])
    assert callers["K1"] == Caller("team-a") and callers["K1"].scope == "team-a"
    assert callers["K3"] == Caller("boss", admin=True) and callers["K3"].scope is None
    assert parse_keys([], []) == {}
    for bad in ("team a:K", "team-a:", ":K", "x" * 65 + ":K"):
        with pytest.raises(ValueError):
            key_tenant(bad)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_active_job_limit_holds_under_concurrent_submits(tmp_path: Path, db: str) -> None:
    def run(url: str) -> None:
        store = Store(url)
        created: list[str] = []
        refused: list[TooManyActiveJobs] = []
        barrier = threading.Barrier(8)

        def submit(i: int) -> None:
            barrier.wait()
            try:
                job, _ = store.create_job({"kind": "train", "seed": i}, tenant="team-a", max_active=LIMIT)
                created.append(job["id"])
            except TooManyActiveJobs as e:
                refused.append(e)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            assert len(created) == LIMIT and len(refused) == 8 - LIMIT
            assert "the limit is 3" in str(refused[0]) and store.count_active_jobs("team-a") == LIMIT
            store.create_job({"kind": "train"}, tenant="team-b", max_active=LIMIT)  # another tenant's own count
            store.request_cancel(created[0])  # an ended job frees a place
            store.create_job({"kind": "train", "seed": 99}, tenant="team-a", max_active=LIMIT)
        finally:
            store.close()

    if db == "sqlite":
        run(f"sqlite:///{tmp_path / 'ldd.db'}")
    else:
        with postgres_database() as url:
            run(url)


# --------------------------------------------------------------------------------------------------
# Over HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = serve_api(
        tmp_path_factory.mktemp("tenants"), LDD_API_KEYS=f"team-a:{KEYS['a']},team-b:{KEYS['b']}",
        LDD_ADMIN_KEYS=f"boss:{KEYS['admin']}", LDD_MAX_ACTIVE_JOBS=str(LIMIT), LDD_MAX_UPLOAD_BYTES="5000000",
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def clients(server: Any) -> Any:
    made = {who: httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
            for who, key in KEYS.items()}  # fmt: skip
    yield made
    for c in made.values():
        c.close()


def _upload_dataset(server: Any, http: httpx.Client, name: str) -> dict[str, Any]:
    path = coco_zip(server.work / f"{name}.zip")
    with open(path, "rb") as f:
        r = http.post("/v1/datasets", files={"file": (path.name, f, "application/zip")}, data={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


def _upload_backbone(server: Any, http: httpx.Client, name: str) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    from distill.checkpoint import build_detector

    path = server.work / f"{name}.pth"
    torch.save(build_detector("gfl_tiny", 2).backbone.state_dict(), path)
    with open(path, "rb") as f:
        r = http.post("/v1/checkpoints", files={"file": (path.name, f, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return r.json()


def _job(dataset: str, **over: Any) -> dict[str, Any]:
    return {"kind": "train", "dataset": dataset, "student": {"arch": "gfl_tiny"},
            "schedule": {"epochs": 1, "batch_size": 2, "image_size": [128, 96]}, **over}  # fmt: skip


@pytest.fixture(scope="module")
def world(server: Any, clients: dict[str, httpx.Client]) -> dict[str, Any]:
    """Team A: a dataset, a backbone, a job and that job's model. Team B: a dataset and a job."""
    a, b = clients["a"], clients["b"]
    w: dict[str, Any] = {"ds_a": _upload_dataset(server, a, "a")["id"], "ds_b": _upload_dataset(server, b, "b")["id"],
                         "ck_a": _upload_backbone(server, a, "a")["id"]}  # fmt: skip
    r = a.post("/v1/jobs", json=_job(w["ds_a"], name="a's"))
    assert r.status_code == 202, r.text
    w["job_a"] = r.json()["id"]
    r = b.post("/v1/jobs", json=_job(w["ds_b"], name="b's"))
    assert r.status_code == 202, r.text
    w["job_b"] = r.json()["id"]
    model = publish_test_model(server.data_dir, server.store_url, ["a", "b"], "mdl_" + w["job_a"][4:], w["job_a"])
    w["mdl_a"] = model["id"]
    return w


def _same_as_missing(r: httpx.Response, missing: httpx.Response, real_id: str, fake_id: str) -> None:
    """Another tenant's id gets exactly what an id naming nothing gets (status, code, message shape)."""
    assert r.status_code == missing.status_code == 404, r.text
    assert error_of(r)["code"] == error_of(missing)["code"] == "not_found"
    assert error_of(r)["message"].replace(real_id, "ID") == error_of(missing)["message"].replace(fake_id, "ID")


def test_reads_of_another_tenant_are_404_like_missing_ids(clients: dict[str, httpx.Client], world: dict) -> None:
    b = clients["b"]
    for path, fake in (
        (f"/v1/datasets/{world['ds_a']}", "ds_0000000000000000"),
        (f"/v1/checkpoints/{world['ck_a']}", "ckpt_0000000000000000"),
        (f"/v1/jobs/{world['job_a']}", "job_0000000000000000"),
        (f"/v1/jobs/{world['job_a']}/events", "job_0000000000000000"),
        (f"/v1/models/{world['mdl_a']}", "mdl_0000000000000000"),
        (f"/v1/models/{world['mdl_a']}/onnx", "mdl_0000000000000000"),
    ):
        real = path.split("/")[3]
        _same_as_missing(b.get(path), b.get(path.replace(real, fake)), real, fake)
    # Cancel and detect: refused, and A's job is untouched.
    _same_as_missing(b.post(f"/v1/jobs/{world['job_a']}/cancel"), b.post("/v1/jobs/job_0000000000000000/cancel"),
                     world["job_a"], "job_0000000000000000")  # fmt: skip
    img = {"file": ("x.png", png_bytes(), "image/png")}
    r = b.post(f"/v1/models/{world['mdl_a']}/detect", files=img)
    _same_as_missing(r, b.post("/v1/models/mdl_0000000000000000/detect", files=img), world["mdl_a"],
                     "mdl_0000000000000000")  # fmt: skip
    _same_as_missing(
        b.post(f"/detect?model={world['mdl_a']}", files=img),
        b.post("/detect?model=mdl_0000000000000000", files=img),
        world["mdl_a"],
        "mdl_0000000000000000",
    )
    assert clients["a"].get(f"/v1/jobs/{world['job_a']}").json()["state"] == "queued"
    # The owner reads all of it.
    a = clients["a"]
    for path in (f"/v1/datasets/{world['ds_a']}", f"/v1/checkpoints/{world['ck_a']}", f"/v1/jobs/{world['job_a']}",
                 f"/v1/models/{world['mdl_a']}", f"/v1/models/{world['mdl_a']}/onnx"):  # fmt: skip
        assert a.get(path).status_code == 200, path
    assert a.get(f"/v1/datasets/{world['ds_a']}").json()["tenant"] == "team-a"


def test_listings_and_detect_show_only_the_callers(clients: dict[str, httpx.Client], world: dict) -> None:
    a, b, admin = clients["a"], clients["b"], clients["admin"]

    def ids(c: httpx.Client, what: str) -> set[str]:
        return {x["id"] for x in c.get(f"/v1/{what}").json()[what]}

    assert ids(a, "datasets") == {world["ds_a"]} and ids(b, "datasets") == {world["ds_b"]}
    assert ids(a, "jobs") == {world["job_a"]} and ids(b, "jobs") == {world["job_b"]}
    assert ids(a, "models") == {world["mdl_a"]} and ids(b, "models") == set()
    assert ids(admin, "datasets") == {world["ds_a"], world["ds_b"]}
    assert ids(admin, "jobs") == {world["job_a"], world["job_b"]} and ids(admin, "models") == {world["mdl_a"]}
    assert b.get("/v1/jobs", params={"state": "queued"}).json()["jobs"][0]["id"] == world["job_b"]
    img = {"file": ("x.png", png_bytes(), "image/png")}
    # /detect without a model: the caller's newest; team B has none (A's model is not offered to it).
    assert a.post("/detect", files=img).json()["model"] == world["mdl_a"]
    r = b.post("/detect", files=img)
    assert r.status_code == 404 and error_of(r)["code"] == "no_model"
    assert admin.post("/detect", files=img).json()["model"] == world["mdl_a"]


def test_submit_refuses_another_tenants_ids_as_unknown(clients: dict[str, httpx.Client], world: dict) -> None:
    b = clients["b"]
    fake = {"ds": "ds_0000000000000000", "ckpt": "ckpt_0000000000000000", "job": "job_0000000000000000",
            "mdl": "mdl_0000000000000000"}  # fmt: skip
    cases = [  # (body with A's id, the same body with an id that names nothing, A's id, the fake)
        (_job(world["ds_a"]), _job(fake["ds"]), world["ds_a"], fake["ds"]),
        (_job(world["ds_b"], student={"arch": "gfl_tiny", "init": {"checkpoint": world["ck_a"]}}),
         _job(world["ds_b"], student={"arch": "gfl_tiny", "init": {"checkpoint": fake["ckpt"]}}),
         world["ck_a"], fake["ckpt"]),
        (_job(world["ds_b"], kind="distill", teacher={"checkpoint": world["ck_a"]}),
         _job(world["ds_b"], kind="distill", teacher={"checkpoint": fake["ckpt"]}), world["ck_a"], fake["ckpt"]),
        (_job(world["ds_b"], kind="distill", teacher={"job": world["job_a"]}),
         _job(world["ds_b"], kind="distill", teacher={"job": fake["job"]}), world["job_a"], fake["job"]),
        (_job(world["ds_b"], kind="distill", teacher={"model": world["mdl_a"]}),
         _job(world["ds_b"], kind="distill", teacher={"model": fake["mdl"]}), world["mdl_a"], fake["mdl"]),
    ]  # fmt: skip
    before = {j["id"] for j in clients["admin"].get("/v1/jobs").json()["jobs"]}
    for theirs, missing, real_id, fake_id in cases:
        r, m = b.post("/v1/jobs", json=theirs), b.post("/v1/jobs", json=missing)
        assert r.status_code == m.status_code == 404, (theirs, r.text)  # never 403: ids do not leak
        assert error_of(r)["code"] == error_of(m)["code"], r.text
        assert error_of(r)["message"].replace(real_id, "ID") == error_of(m)["message"].replace(fake_id, "ID")
    assert {j["id"] for j in clients["admin"].get("/v1/jobs").json()["jobs"]} == before  # nothing stored
    # The owner's own teacher job is found (and refused only because it has not succeeded).
    r = clients["a"].post("/v1/jobs", json=_job(world["ds_a"], kind="distill", teacher={"job": world["job_a"]}))
    assert r.status_code == 422 and "not succeeded" in error_of(r)["message"]


def test_idempotency_keys_are_per_tenant(clients: dict[str, httpx.Client], world: dict) -> None:
    key = {"Idempotency-Key": "nightly-1"}
    ra = clients["a"].post("/v1/jobs", json=_job(world["ds_a"], seed=1), headers=key)
    rb = clients["b"].post("/v1/jobs", json=_job(world["ds_b"], seed=2), headers=key)
    assert ra.status_code == rb.status_code == 202 and ra.json()["id"] != rb.json()["id"]
    again = clients["b"].post("/v1/jobs", json=_job(world["ds_b"], seed=2), headers=key)
    assert again.json()["id"] == rb.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    for c, r in ((clients["a"], ra), (clients["b"], rb)):
        assert c.post(f"/v1/jobs/{r.json()['id']}/cancel").json()["state"] == "cancelled"


def test_active_job_limit_answers_429_per_tenant(clients: dict[str, httpx.Client], world: dict) -> None:
    a, b = clients["a"], clients["b"]
    active = [j["id"] for j in a.get("/v1/jobs").json()["jobs"] if j["state"] in ("queued", "running")]
    made = []
    for i in range(LIMIT - len(active)):
        r = a.post("/v1/jobs", json=_job(world["ds_a"], seed=100 + i))
        assert r.status_code == 202, r.text
        made.append(r.json()["id"])
    r = a.post("/v1/jobs", json=_job(world["ds_a"], seed=200))
    assert r.status_code == 429, r.text
    err = error_of(r)
    assert err["code"] == "too_many_active_jobs" and f"the limit is {LIMIT}" in err["message"]
    assert err["details"] == {"active": LIMIT, "limit": LIMIT}
    assert b.post("/v1/jobs", json=_job(world["ds_b"], seed=200)).status_code == 202  # B has its own count
    # Cancelling one frees a place (the admin may cancel any tenant's job).
    assert clients["admin"].post(f"/v1/jobs/{made[-1] if made else active[0]}/cancel").status_code == 200
    assert a.post("/v1/jobs", json=_job(world["ds_a"], seed=201)).status_code == 202


def test_admin_reads_and_cancels_any_tenant(clients: dict[str, httpx.Client], world: dict) -> None:
    admin = clients["admin"]
    for path in (f"/v1/datasets/{world['ds_b']}", f"/v1/checkpoints/{world['ck_a']}", f"/v1/jobs/{world['job_a']}",
                 f"/v1/models/{world['mdl_a']}/onnx"):  # fmt: skip
        assert admin.get(path).status_code == 200, path
    # An admin's job may name any tenant's files; it belongs to the admin's tenant.
    r = admin.post(
        "/v1/jobs", json=_job(world["ds_a"], student={"arch": "gfl_tiny", "init": {"checkpoint": world["ck_a"]}})
    )
    assert r.status_code == 202 and r.json()["tenant"] == "boss"
    assert clients["a"].get(f"/v1/jobs/{r.json()['id']}").status_code == 404
    assert admin.post(f"/v1/jobs/{world['job_b']}/cancel").json()["state"] == "cancelled"


def test_without_a_key_nothing_but_health(server: Any) -> None:
    for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/datasets"), ("GET", "/v1/models"), ("POST", "/detect"),
                         ("GET", "/v1/jobs/job_0000000000000000")):  # fmt: skip
        r = httpx.request(method, server.url + path, headers={"Authorization": "Bearer not-a-key"})
        assert r.status_code == 401 and error_of(r)["code"] == "unauthorized", path
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_open_service_is_one_tenant(tmp_path: Path) -> None:
    """Without keys: no auth, the default tenant, which sees rows of every tenant (e.g. from a keyed past)."""
    srv = serve_api(tmp_path)
    try:
        store = Store(srv.store_url)
        try:
            store.add_dataset("ds_000000000000a11e", "a", "datasets/ds_000000000000a11e", ["x"], 1, 1, {}, [], "team-a")
        finally:
            store.close()
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert [d["id"] for d in http.get("/v1/datasets").json()["datasets"]] == ["ds_000000000000a11e"]
            ds = _upload_dataset(srv, http, "open")
            assert ds["tenant"] == DEFAULT_TENANT
            assert http.get("/v1/datasets/ds_000000000000a11e").status_code == 200
    finally:
        srv.stop()

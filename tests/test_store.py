"""The job store on SQLite and on PostgreSQL (a fresh database per run on the local server)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime

import pytest
import sqlalchemy as sa

from core.store import IdempotencyConflict, Store
from tests.service_fixtures import postgres_database

SPEC = {"kind": "train", "dataset": "ds_1", "schedule": {"epochs": 2}}


@pytest.fixture(scope="module")
def pg_url():
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ldd.db'}"
    url = request.getfixturevalue("pg_url")
    # One database per module; empty its tables so every test starts from nothing.
    s = Store(url)
    with s.engine.begin() as conn:
        for t in ("jobs", "models", "datasets", "checkpoints"):
            conn.execute(sa.text(f"DELETE FROM {t}"))
    s.close()
    return url


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


def test_datasets_checkpoints_roundtrip(store):
    d = store.add_dataset("ds_a", "raccoon", "/x/ds_a", ["raccoon"], 10, 12, {"train": 8, "val": 2}, ["p"])
    assert d["classes"] == ["raccoon"] and d["splits"] == {"train": 8, "val": 2}
    assert store.get_dataset("ds_a") == d
    assert store.get_dataset("nope") is None
    store.add_dataset("ds_b", "b", "/x/ds_b", ["a", "b"], 1, 0, {}, [])
    assert {x["id"] for x in store.list_datasets()} == {"ds_a", "ds_b"}
    datetime.fromisoformat(d["created_at"])  # ISO timestamps

    c = store.add_checkpoint("ck_1", "/x/ck_1.pt", {"arch": "gfl_r18", "reg_max": 16}, "teacher")
    assert store.get_checkpoint("ck_1") == c and c["arch"]["reg_max"] == 16


def test_create_job_and_idempotency(store):
    job, created = store.create_job(SPEC)
    assert created and job["state"] == "queued" and job["id"].startswith("job_") and job["attempts"] == 0
    assert job["spec"] == SPEC and job["kind"] == "train"
    assert store.get_job(job["id"]) == job

    a, created_a = store.create_job(SPEC, idempotency_key="k1")
    b, created_b = store.create_job(dict(SPEC), idempotency_key="k1")
    assert created_a and not created_b and a["id"] == b["id"]
    with pytest.raises(IdempotencyConflict):
        store.create_job({**SPEC, "seed": 1}, idempotency_key="k1")
    assert len(store.list_jobs()) == 2


def test_idempotency_race(store_url):
    """Requests with the same key arriving together make one job."""
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        s = Store(store_url)
        barrier.wait()
        job, _ = s.create_job(SPEC, idempotency_key="race")
        ids.append(job["id"])
        s.close()

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 1


def test_claim_race_one_winner_per_job(store_url):
    """Workers racing over the same jobs: every job is claimed exactly once."""
    setup = Store(store_url)
    job_ids = [setup.create_job(SPEC)[0]["id"] for _ in range(12)]
    wins: list[tuple[str, str]] = []
    barrier = threading.Barrier(4)

    def worker(n: int) -> None:
        s = Store(store_url)
        barrier.wait()
        for jid in job_ids:
            if s.claim(jid, f"w{n}", lease_seconds=30) is not None:
                wins.append((jid, f"w{n}"))
        s.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_job = Counter(j for j, _ in wins)
    assert sorted(per_job) == sorted(job_ids) and set(per_job.values()) == {1}
    for jid, owner in wins:
        job = setup.get_job(jid)
        assert job["state"] == "running" and job["lease_owner"] == owner and job["attempts"] == 1
    assert setup.count_jobs_by_state()["running"] == 12
    setup.close()


def test_heartbeat_finish_and_lease_fencing(store):
    job, _ = store.create_job(SPEC)
    jid = job["id"]
    assert store.heartbeat(jid, "w1") is False  # not claimed yet
    claimed = store.claim(jid, "w1", lease_seconds=30)
    assert claimed["state"] == "running" and claimed["started_at"]
    assert store.claim(jid, "w2", lease_seconds=30) is None  # lease held
    assert store.heartbeat(jid, "w1", progress={"epoch": 1, "iter": 5}) is True
    assert store.get_job(jid)["progress"] == {"epoch": 1, "iter": 5}
    assert store.heartbeat(jid, "w2") is False
    assert store.control(jid, "w1") == "ok" and store.control(jid, "w2") == "lost"
    assert store.finish(jid, "w2", "succeeded") is None  # only the owner ends it
    done = store.finish(jid, "w1", "succeeded", metrics={"bbox": {"AP": 0.5}}, model_id="mdl_x")
    assert done["state"] == "succeeded" and done["model_id"] == "mdl_x" and done["lease_owner"] is None
    assert done["finished_at"] and done["metrics"]["bbox"]["AP"] == 0.5
    assert store.claim(jid, "w2", lease_seconds=30) is None  # finished jobs are never claimed again
    with pytest.raises(ValueError):
        store.finish(jid, "w1", "succeeded", bogus=1)


def test_cancel(store):
    queued, _ = store.create_job(SPEC)
    c = store.request_cancel(queued["id"])
    assert c["state"] == "cancelled" and c["finished_at"]
    assert store.claim(queued["id"], "w1", 30) is None

    running, _ = store.create_job(SPEC)
    store.claim(running["id"], "w1", 30)
    c = store.request_cancel(running["id"])
    assert c["state"] == "running" and c["cancel_requested"] is True
    assert store.control(running["id"], "w1") == "cancel"
    assert store.heartbeat(running["id"], "w1") is False  # the worker stops
    assert store.finish(running["id"], "w1", "cancelled")["state"] == "cancelled"
    assert store.request_cancel(running["id"])["state"] == "cancelled"  # no-op when finished
    with pytest.raises(KeyError):
        store.request_cancel("job_missing")


def test_requeue_expired_attempts_and_max_attempts(store):
    job, _ = store.create_job(SPEC)
    jid = job["id"]
    # A lease long enough that a stalled CI machine cannot see it expire before the next line runs.
    assert store.claim(jid, "w1", lease_seconds=1.0)["attempts"] == 1
    assert store.requeue_expired() == []  # lease still valid
    time.sleep(1.1)
    assert store.claim(jid, "w2", lease_seconds=0.2, max_attempts=3)["attempts"] == 2  # expired: taken over
    assert store.finish(jid, "w1", "failed") is None  # w1 lost its lease
    time.sleep(0.3)
    assert store.requeue_expired(max_attempts=3) == [jid]
    j = store.get_job(jid)
    assert j["state"] == "queued" and j["lease_owner"] is None and "w2" in j["last_error"]
    assert store.heartbeat(jid, "w2") is False
    assert store.claim(jid, "w3", lease_seconds=0.2, max_attempts=3)["attempts"] == 3
    time.sleep(0.3)
    assert store.requeue_expired(max_attempts=3) == []  # third attempt lost: gives up
    j = store.get_job(jid)
    assert j["state"] == "failed" and "gave up after 3 attempt" in j["error"] and "w3" in j["error"]

    # A job released with its attempts used up is failed at its next claim, with the reason.
    job2, _ = store.create_job(SPEC)
    store.claim(job2["id"], "w1", 30)
    store.finish(job2["id"], "w1", "queued", last_error="training process killed by signal 9")
    assert store.claim(job2["id"], "w2", 30, max_attempts=1) is None
    j2 = store.get_job(job2["id"])
    assert j2["state"] == "failed" and "signal 9" in j2["error"]

    # A cancel requested while the worker died ends as cancelled, not queued.
    job3, _ = store.create_job(SPEC)
    store.claim(job3["id"], "w1", 0.2)
    store.request_cancel(job3["id"])
    time.sleep(0.3)
    assert store.requeue_expired() == []
    assert store.get_job(job3["id"])["state"] == "cancelled"


def test_stale_queued_and_list(store):
    a, _ = store.create_job(SPEC)
    time.sleep(0.05)
    b, _ = store.create_job(SPEC)
    assert [j["id"] for j in store.list_jobs()] == [b["id"], a["id"]]  # newest first
    assert [j["id"] for j in store.list_jobs(limit=1)] == [b["id"]]
    assert store.stale_queued(3600) == []
    assert set(store.stale_queued(0)) == {a["id"], b["id"]}
    store.mark_enqueued([a["id"]])
    assert store.stale_queued(1) == []
    store.claim(a["id"], "w", 30)
    assert [j["id"] for j in store.list_jobs(state="running")] == [a["id"]]
    counts = store.count_jobs_by_state()
    assert counts["queued"] == 1 and counts["running"] == 1 and counts["failed"] == 0


def test_models_once_per_job(store):
    assert store.newest_model() is None
    m1 = store.add_model("mdl_1", "job_1", "/m/mdl_1", {"classes": ["a"]})
    time.sleep(0.01)
    m2 = store.add_model("mdl_2", "job_2", "/m/mdl_2", {"classes": ["b"]})
    assert store.add_model("mdl_1", "job_1", "/m/mdl_1", {}) == m1  # idempotent
    assert store.add_model("mdl_other", "job_1", "/m/x", {}) == m1  # one model per job
    assert [m["id"] for m in store.list_models()] == ["mdl_2", "mdl_1"]
    assert store.newest_model() == m2 and store.get_model("mdl_1") == m1
    assert store.model_for_job("job_2") == m2


def test_additive_migration(tmp_path):
    """An older database without newer columns gets them on start and keeps its rows."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE models (id VARCHAR(64) PRIMARY KEY, path TEXT, meta JSON)"))
        conn.execute(sa.text("INSERT INTO models (id, path, meta) VALUES ('mdl_old', '/m', '{}')"))
    engine.dispose()
    s = Store(url)
    cols = {c["name"] for c in sa.inspect(s.engine).get_columns("models")}
    assert {"job_id", "created_at"} <= cols
    assert s.get_model("mdl_old")["key"] == "models/mdl_old"  # 0008: a path without models/ gets its id's key
    s.add_model("mdl_new", "job_x", "/n", {})
    assert s.model_for_job("job_x")["id"] == "mdl_new"

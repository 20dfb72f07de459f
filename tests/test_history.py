"""A job's history (``core.history``, ``GET /v1/jobs/{id}/history``), on SQLite and PostgreSQL.

- migration 0003 adds the table to a store at 0002 with its rows kept, and goes back down;
- the worker's progress relay (``worker.jobs.Attempt``) appends each record it relays, skips a ``progress.json``
  left by an earlier attempt, and a resumed attempt replaces what the dead one recorded past its checkpoint;
- the records survive a new process opening the store (a worker restart);
- the route answers them, scoped to the caller's tenant, 404 for another tenant's job.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient

from api.app import create_app
from core import history
from core.db import alembic_config, current_revision, head_revision, make_engine
from core.settings import Settings
from core.store import Store
from tests.service_fixtures import postgres_database
from worker.jobs import Attempt

SPEC = {"kind": "train", "dataset": "ds_x", "schedule": {"epochs": 2}}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ldd.db'}"
        return
    with postgres_database() as pg:
        yield pg


def _progress(it: int, resumed_from: int | None = None, phase: str = "train", **losses: float) -> dict[str, Any]:
    return {"phase": phase, "epoch": 1, "epochs": 2, "iter": it, "total_iters": 100,
            "losses": losses or {"loss_cls": 1.0 / (1 + it)}, "lr": 0.01, "resumed_from_iter": resumed_from,
            "time": time.time()}  # fmt: skip


def test_migration_adds_the_table_keeps_rows_and_goes_down(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "0002")
            conn.commit()
        with engine.begin() as conn:
            assert "job_history" not in sa.inspect(conn).get_table_names()
        store = Store(url)  # migrates to head
        job, _ = store.create_job(SPEC)
        history.append(store, job["id"], 1, _progress(5))
        store.close()
        with engine.connect() as conn:
            assert current_revision(conn) == head_revision()  # 0003 and any later migration
            command.downgrade(alembic_config(conn), "0002")
            conn.commit()
        with engine.begin() as conn:
            assert "job_history" not in sa.inspect(conn).get_table_names()
        store = Store(url)  # back up again: the job is still there, its history starts empty
        try:
            assert store.get_job(job["id"]) is not None and history.read(store, job["id"]) == []
        finally:
            store.close()
    finally:
        engine.dispose()


def _attempt(store: Store, tmp_path: Path, job_id: str) -> Attempt:
    settings = Settings(data_dir=tmp_path / "data", store_url=store.url, lease_seconds=30)
    claimed = store.claim(job_id, f"test:{os.getpid()}", settings.lease_seconds)
    assert claimed is not None
    return Attempt(store, settings, claimed, f"test:{os.getpid()}")


def _write_progress(attempt: Attempt, record: dict[str, Any]) -> None:
    attempt.run_dir.mkdir(parents=True, exist_ok=True)
    path = attempt.run_dir / "progress.json"
    path.write_text(json.dumps(record))
    os.utime(path, (record["time"], record["time"]))  # a new mtime however fast the test runs
    with open(attempt.run_dir / "progress.jsonl", "a") as f:  # as distill.train writes: latest + every record
        f.write(json.dumps(record) + "\n")


def test_relay_records_history_that_survives_restarts_and_resumes(url: str, tmp_path: Path) -> None:
    store = Store(url)
    try:
        job, _ = store.create_job(SPEC)
        first = _attempt(store, tmp_path, job["id"])
        for it in (10, 20, 30, 40):
            _write_progress(first, _progress(it))
            first._relay_progress(force=True)
        assert [r["iter"] for r in history.read(store, job["id"])] == [10, 20, 30, 40]
        # The worker dies; its lease runs out and the job is queued again.
        with store._tx() as conn:
            conn.execute(sa.text("UPDATE jobs SET lease_expires_at = :t WHERE id = :id"),
                         {"t": datetime(2000, 1, 1), "id": job["id"]})  # fmt: skip
        assert store.requeue_expired() == [job["id"]]
    finally:
        store.close()

    store = Store(url)  # another process: the history is in the store, not in the dead worker's memory
    try:
        assert [r["iter"] for r in history.read(store, job["id"])] == [10, 20, 30, 40]
        second = _attempt(store, tmp_path, job["id"])
        assert second.job["attempts"] == 2
        # The first relay of the new attempt finds the dead attempt's progress.json: not this attempt's record.
        stale = {**_progress(40), "time": time.time() - 60}
        _write_progress(second, stale)
        second._relay_progress(force=True)
        assert len(history.read(store, job["id"])) == 4
        # The new child resumes from the checkpoint at iteration 20: the dead attempt's 30 and 40 are gone.
        for it in (25, 35):
            _write_progress(second, _progress(it, resumed_from=20))
            second._relay_progress(force=True)
        _write_progress(second, _progress(100, resumed_from=20, phase="done", AP=0.41, AP50=0.6, AP75=0.4))
        second._relay_progress(force=True)
        rows = history.read(store, job["id"])
        assert [(r["iter"], r["attempt"]) for r in rows] == [(10, 1), (20, 1), (25, 2), (35, 2), (100, 2)]
        assert rows[0]["lr"] == 0.01 and rows[0]["losses"]["loss_cls"] == pytest.approx(1 / 11)
        assert [r["iter"] for r in history.read(store, job["id"], after=25)] == [35, 100]
        assert history.count(store, job["id"]) == 5
    finally:
        store.close()


def test_route_is_tenant_scoped(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_keys=["team-a:KA", "team-b:KB"], broker_url="memory://")
    app = create_app(settings)
    store = Store(settings.store_url)
    try:
        mine, _ = store.create_job(SPEC, tenant="team-a")
        for it in (1, 2):
            history.append(store, mine["id"], 1, _progress(it))
        history.append(store, mine["id"], 1, _progress(3, phase="done", AP=0.5, AP50=0.7, AP75=0.5))
        with TestClient(app) as client:
            r = client.get(f"/v1/jobs/{mine['id']}/history", headers={"Authorization": "Bearer KA"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert [x["iter"] for x in body["records"]] == [1, 2, 3] and body["records"][0]["attempt"] == 1
            assert body["evaluations"] == [{"iter": 3, "attempt": 1, "bbox": {"AP": 0.5, "AP50": 0.7, "AP75": 0.5}}]
            r = client.get(f"/v1/jobs/{mine['id']}/history?after=2", headers={"Authorization": "Bearer KA"})
            assert [x["iter"] for x in r.json()["records"]] == [3]
            theirs = client.get(f"/v1/jobs/{mine['id']}/history", headers={"Authorization": "Bearer KB"})
            assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "not_found"
            assert client.get(f"/v1/jobs/{mine['id']}/history").status_code == 401
            assert client.get("/v1/jobs/job_0000000000000000/history",
                              headers={"Authorization": "Bearer KA"}).status_code == 404  # fmt: skip
    finally:
        store.close()


def test_a_throttled_relay_still_records_every_record(url: str, tmp_path: Path) -> None:
    """The relay to ``jobs.progress`` sends the latest record at most every ``progress_seconds``; records
    written in between (a fast epoch) still reach the history, and a half-written last line waits."""
    store = Store(url)
    try:
        job, _ = store.create_job(SPEC)
        attempt = _attempt(store, tmp_path, job["id"])
        for it in (1, 2, 3):
            _write_progress(attempt, _progress(it))
        attempt._relay_progress(force=True)
        for it in (4, 5):
            _write_progress(attempt, _progress(it))
        with open(attempt.run_dir / "progress.jsonl", "a") as f:
            f.write(json.dumps(_progress(6))[:20])  # the trainer is halfway through this line
        attempt._relay_progress(force=True)
        assert [r["iter"] for r in history.read(store, job["id"])] == [1, 2, 3, 4, 5]
        assert attempt.progress is not None and attempt.progress["iter"] == 5  # the latest, for jobs.progress
    finally:
        store.close()

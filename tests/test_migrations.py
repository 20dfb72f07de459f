"""The job store's Alembic migrations on SQLite and PostgreSQL (a fresh database per test on the local server).

- a fresh database is brought to the newest revision, and its schema is the one ``core.schema`` declares;
- a store made by the code before migrations existed (its DDL below, as ``worker/store.py`` created it, with
  rows in every table) is adopted: every row is kept, and the service reads and updates them;
- processes opening a new store at the same moment migrate it once, without errors.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from core.checks import teacher_overlap
from core.db import alembic_config, current_revision, head_revision, make_engine
from core.schema import metadata
from core.store import JOB_STATES, IdempotencyConflict, Store, spec_digest
from core.tenants import DEFAULT_TENANT
from distill.data.annotations import file_sha256, load_coco, split
from distill.spec import JobSpec
from tests.service_fixtures import postgres_database
from tests.test_dataset_split import dataset_folder

# The schema the store had before migrations (SQLAlchemy's DDL for the ORM classes of the old
# ``worker/store.py`` on SQLite; PostgreSQL's differs only in the timestamp type).
LEGACY_DDL = [
    """CREATE TABLE checkpoints (
        id VARCHAR(64) NOT NULL, name VARCHAR(200), path TEXT NOT NULL, arch JSON NOT NULL,
        created_at DATETIME NOT NULL, PRIMARY KEY (id))""",
    """CREATE TABLE datasets (
        id VARCHAR(64) NOT NULL, name VARCHAR(200) NOT NULL, path TEXT NOT NULL, classes JSON NOT NULL,
        num_images INTEGER NOT NULL, num_boxes INTEGER NOT NULL, splits JSON NOT NULL, problems JSON NOT NULL,
        created_at DATETIME NOT NULL, PRIMARY KEY (id))""",
    """CREATE TABLE jobs (
        id VARCHAR(64) NOT NULL, kind VARCHAR(16) NOT NULL, name VARCHAR(200), state VARCHAR(16) NOT NULL,
        spec JSON NOT NULL, spec_sha256 VARCHAR(64) NOT NULL, progress JSON, metrics JSON, error TEXT,
        last_error TEXT, attempts INTEGER NOT NULL, lease_owner VARCHAR(200), lease_seconds FLOAT,
        lease_expires_at DATETIME, heartbeat_at DATETIME, cancel_requested BOOLEAN NOT NULL,
        idempotency_key VARCHAR(255), model_id VARCHAR(64), enqueued_at DATETIME, created_at DATETIME NOT NULL,
        started_at DATETIME, finished_at DATETIME, updated_at DATETIME NOT NULL,
        PRIMARY KEY (id), UNIQUE (idempotency_key))""",
    "CREATE INDEX ix_jobs_state ON jobs (state)",
    "CREATE INDEX ix_jobs_created_at ON jobs (created_at)",
    """CREATE TABLE models (
        id VARCHAR(64) NOT NULL, job_id VARCHAR(64), path TEXT NOT NULL, meta JSON NOT NULL,
        created_at DATETIME NOT NULL, PRIMARY KEY (id), UNIQUE (job_id))""",
    "CREATE INDEX ix_models_created_at ON models (created_at)",
]
# Columns the old code added with ALTER TABLE when it found them missing: a store may lack them.
LATE_COLUMNS = ("last_error TEXT,", "enqueued_at DATETIME,")

T0 = datetime(2026, 11, 1, 12, 0, 0, 123456)
SPEC = {"kind": "train", "dataset": "ds_old", "schedule": {"epochs": 2}}


def legacy_rows(with_late_columns: bool) -> dict[str, list[dict]]:
    """Rows in every table, as the old code wrote them: a job in each state, a model for the finished one."""
    jobs = []
    for i, state in enumerate(("queued", "running", "succeeded", "failed", "cancelled")):
        running = state == "running"
        job = dict(
            id=f"job_{i}", kind="train", name=f"j{i}", state=state, spec=json.dumps(SPEC),
            spec_sha256=spec_digest(SPEC),
            progress=json.dumps({"epoch": i}) if i else None, metrics=json.dumps({"AP": 0.5}) if i == 2 else None,
            error="boom" if state == "failed" else None, attempts=i, lease_owner="host:1:abc" if running else None,
            lease_seconds=60.0 if running else None, lease_expires_at=T0 + timedelta(hours=1) if running else None,
            heartbeat_at=T0 if running else None, cancel_requested=state == "cancelled",
            idempotency_key=f"key{i}" if i % 2 else None, model_id="mdl_2" if i == 2 else None,
            created_at=T0 + timedelta(seconds=i), started_at=T0 if i else None,
            finished_at=T0 if state in ("succeeded", "failed", "cancelled") else None, updated_at=T0,
        )  # fmt: skip
        if with_late_columns:
            job.update(last_error="lost once" if i == 3 else None, enqueued_at=T0 if state == "queued" else None)
        jobs.append(job)
    return {
        "datasets": [dict(id="ds_old", name="old", path="/data/datasets/ds_old", classes=json.dumps(["cat", "dog"]),
                          num_images=10, num_boxes=12, splits=json.dumps({"train": 8}), problems=json.dumps([]),
                          created_at=T0)],
        "checkpoints": [dict(id="ck_old", name=None, path="/srv/ldd/checkpoints/ck_old.pt", created_at=T0,
                             arch=json.dumps({"kind": "detector", "reg_max": 16}))],
        "jobs": jobs,
        "models": [dict(id="mdl_2", job_id="job_2", path="/data/models/mdl_2", created_at=T0,
                        meta=json.dumps({"classes": ["cat", "dog"], "sha256": "cd" * 32}))],
    }  # fmt: skip


def make_legacy_store(url: str, with_late_columns: bool = True) -> dict[str, list[dict]]:
    """A store as the code before migrations left it, with rows; returns the rows."""
    engine = make_engine(url)
    rows = legacy_rows(with_late_columns)
    with engine.begin() as conn:
        for ddl in LEGACY_DDL:
            if not with_late_columns:
                for col in LATE_COLUMNS:
                    ddl = ddl.replace(col, "")
            if conn.dialect.name == "postgresql":
                ddl = ddl.replace("DATETIME", "TIMESTAMP WITHOUT TIME ZONE")
            conn.exec_driver_sql(ddl)
        for table, table_rows in rows.items():
            for row in table_rows:
                cols = ", ".join(row)
                conn.execute(sa.text(f"INSERT INTO {table} ({cols}) VALUES ({', '.join(':' + c for c in row)})"),
                             row)  # fmt: skip
    engine.dispose()
    return rows


def table_contents(url: str) -> dict[str, list[dict[str, object]]]:
    """Every row of the four first tables, by column name."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {t: [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY id"))]
                    for t in ("datasets", "checkpoints", "jobs", "models")}  # fmt: skip
    finally:
        engine.dispose()


# Columns later revisions added to rows that already existed, and the value an old row gets.
# The legacy data set's images name no validation split, so 0006 gives it the draw its jobs made: seed 0, 0.2.
ADDED_COLUMNS = {"tenant": DEFAULT_TENANT, "format": "fp32", "fp32_id": None, "val_split": 0.2, "split_seed": 0}


# 0008: an absolute path in the data folder became the storage key it names (core.artifacts).
KEYS = {"/data/datasets/ds_old": "datasets/ds_old", "/srv/ldd/checkpoints/ck_old.pt": "checkpoints/ck_old.pt",
        "/data/models/mdl_2": "models/mdl_2"}  # fmt: skip


def _renamed(row: dict[str, object]) -> dict[str, object]:
    return {**{k: v for k, v in row.items() if k != "path"}, "key": KEYS[str(row["path"])]} if "path" in row else row


def kept(before: list[dict[str, object]], after: list[dict[str, object]]) -> bool:
    """Every row and value of ``before`` is still in ``after`` (a path as its storage key); a column added since
    is empty, or holds what its revision gives an old row (``ADDED_COLUMNS``)."""
    before = [_renamed(row) for row in before]
    return len(before) == len(after) and all(
        all(new[k] == old[k] for k in old) and all(v == ADDED_COLUMNS.get(k) for k, v in new.items() if k not in old)
        for old, new in zip(before, after, strict=True)
    )


def schema_differences(url: str) -> list:
    """What Alembic's autogenerate would change to make the database match ``core.schema``."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> Iterator[str]:
    """A new, empty database for each test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ldd.db'}"
        return
    with postgres_database() as pg:
        yield pg


def test_fresh_database_is_migrated_to_head_with_the_declared_schema(url):
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            assert current_revision(conn) == head_revision() is not None
        store.add_dataset("ds_1", "d", "/d", ["a"], 1, 1, {}, [])
        assert store.get_dataset("ds_1")["classes"] == ["a"]
    finally:
        store.close()
    assert schema_differences(url) == []
    Store(url).close()  # a store at head opens without migrating again
    assert table_contents(url)["datasets"][0]["id"] == "ds_1"


@pytest.mark.parametrize("with_late_columns", [True, False], ids=["todays-store", "without-altered-columns"])
def test_store_made_before_migrations_keeps_every_row(url, with_late_columns):
    rows = make_legacy_store(url, with_late_columns)
    before = table_contents(url)
    assert {t: len(r) for t, r in before.items()} == {t: len(r) for t, r in rows.items()}

    store = Store(url)
    try:
        with store.engine.connect() as conn:
            assert current_revision(conn) == head_revision()
        after = table_contents(url)
        for table, contents in before.items():
            # Every row and value is still there; the columns the old code added with ALTER TABLE are empty,
            # the tenant (0002) is the default one and a model's format (0005) fp32.
            assert kept(contents, after[table]), table

        # The service reads the old rows ...
        assert store.get_dataset("ds_old")["classes"] == ["cat", "dog"]
        assert store.get_dataset("ds_old")["tenant"] == DEFAULT_TENANT
        assert [d["id"] for d in store.list_datasets(tenant=DEFAULT_TENANT)] == ["ds_old"]
        assert store.list_datasets(tenant="team-a") == [] and store.newest_model(tenant="team-a") is None
        assert store.get_checkpoint("ck_old")["arch"]["reg_max"] == 16
        assert [j["id"] for j in store.list_jobs()] == [f"job_{i}" for i in reversed(range(5))]
        assert store.count_jobs_by_state() == dict.fromkeys(JOB_STATES, 1)
        done = store.get_job("job_2")
        assert done["metrics"] == {"AP": 0.5} and done["model_id"] == "mdl_2" and done["spec"] == SPEC
        assert done["created_at"] == (T0 + timedelta(seconds=2)).isoformat() + "+00:00"
        assert store.get_job("job_4")["cancel_requested"] is True
        assert store.model_for_job("job_2")["meta"]["sha256"] == "cd" * 32
        # ... and goes on with them: the idempotency keys still hold, the queued job runs, models publish.
        again, created = store.create_job(SPEC, idempotency_key="key1")
        assert not created and again["id"] == "job_1"
        claimed = store.claim("job_0", "new-worker", 30)
        assert claimed is not None and claimed["attempts"] == 1
        assert store.finish("job_0", "new-worker", "queued", last_error="retry")["last_error"] == "retry"
        assert store.add_model("mdl_0", "job_2", "/m/x", {}) == store.get_model("mdl_2")  # one model per job
    finally:
        store.close()
    if with_late_columns:
        assert schema_differences(url) == []  # the adopted store has the fresh store's schema


def test_stores_opened_together_migrate_once(url):
    errors: list[BaseException] = []
    barrier = threading.Barrier(5)

    def open_store() -> None:
        try:
            barrier.wait()
            Store(url).close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [head_revision()]
    finally:
        engine.dispose()
    assert schema_differences(url) == []


def test_upgrade_to_tenants_keeps_rows_and_scopes_idempotency_keys(url):
    """A store at revision 0001 (before tenants) with rows in every table, upgraded to head: every row is kept
    and belongs to the default tenant; idempotency keys become unique per tenant."""
    engine = make_engine(url)
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), "0001")
        conn.commit()
    rows = legacy_rows(with_late_columns=True)
    with engine.begin() as conn:
        for table, table_rows in rows.items():
            for row in table_rows:
                conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(row)}) VALUES "
                                     f"({', '.join(':' + c for c in row)})"), row)  # fmt: skip
    engine.dispose()
    before = table_contents(url)

    store = Store(url)
    try:
        after = table_contents(url)
        for table, contents in before.items():
            assert kept(contents, after[table]), table
            assert {r["tenant"] for r in after[table]} == {DEFAULT_TENANT}, table
        assert len(store.list_jobs(tenant=DEFAULT_TENANT)) == 5 and store.list_jobs(tenant="team-a") == []
        assert store.count_active_jobs(DEFAULT_TENANT) == 2  # the queued and the running job
        # The default tenant's keys still hold; another tenant may use the same key for its own job.
        again, created = store.create_job(SPEC, idempotency_key="key1")
        assert not created and again["id"] == "job_1"
        with pytest.raises(IdempotencyConflict):
            store.create_job({**SPEC, "seed": 3}, idempotency_key="key1")
        theirs, created = store.create_job({**SPEC, "seed": 3}, idempotency_key="key1", tenant="team-a")
        assert created and theirs["tenant"] == "team-a" and theirs["id"] != "job_1"
        # A model takes the tenant of the job that made it.
        assert store.add_model("mdl_a", theirs["id"], "/m/a", {})["tenant"] == "team-a"
        assert [m["id"] for m in store.list_models(tenant="team-a")] == ["mdl_a"]
    finally:
        store.close()
    assert schema_differences(url) == []


def test_upgrade_to_model_formats_links_siblings_to_their_job(url):
    """A store at revision 0004, where a job's int8 model was a row without a job (its meta named the job, its
    precision and its fp32 sibling), upgraded to head: every model carries its job and precision as columns,
    and the uniqueness is per job and precision."""
    engine = make_engine(url)
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), "0004")
        conn.commit()
    old = [dict(id="mdl_a", job_id="job_a", meta={"classes": ["x"], "format": "onnx-detector/1", "variants":
                                                  {"int8": "mdl_aint8"}}),
           dict(id="mdl_aint8", job_id=None, meta={"classes": ["x"], "format": "int8", "fp32_id": "mdl_a",
                                                   "job_id": "job_a"}),
           dict(id="mdl_free", job_id=None, meta={"classes": ["y"]})]  # fmt: skip
    with engine.begin() as conn:
        for row in old:
            insert = "INSERT INTO models (id, job_id, path, meta, created_at) VALUES (:id, :job_id, '/m', :meta, :t)"
            conn.execute(sa.text(insert), {**row, "meta": json.dumps(row["meta"]), "t": T0})
    engine.dispose()

    store = Store(url)
    try:
        by_id = {m["id"]: m for m in store.list_models()}
        assert [(by_id[i]["job_id"], by_id[i]["format"], by_id[i]["fp32_id"]) for i in sorted(by_id)] == [
            ("job_a", "fp32", None), ("job_a", "int8", "mdl_a"), (None, "fp32", None)]  # fmt: skip
        assert [m["id"] for m in store.models_for_job("job_a")] == ["mdl_a", "mdl_aint8"]
        assert store.model_for_job("job_a")["id"] == "mdl_a"
        # One model per job and precision: a second int8 model of the job is the one already there ...
        assert store.add_model("mdl_b", "job_a", "/m", {}, format="int8", fp32_id="mdl_a")["id"] == "mdl_aint8"
        # ... and an fp16 one is new.
        assert store.add_model("mdl_afp16", "job_a", "/m", {}, format="fp16", fp32_id="mdl_a")["job_id"] == "job_a"
        with pytest.raises(ValueError, match="fp32 sibling"):
            store.add_model("mdl_c", "job_c", "/m", {}, format="int8")
    finally:
        store.close()
    assert schema_differences(url) == []


def test_upgrade_to_dataset_splits_stores_the_split_the_jobs_used(url, tmp_path):
    """A store at revision 0005 with a data set whose images name no split (jobs with seeds 0 and 1 on it), one
    with its own split, and one whose folder is gone, upgraded to head: the first gets the old code's seed-0 draw
    and its images' hashes, the seed-1 job keeps the draw it trained on (``jobs.split_draw``), so as a teacher it is
    known to have seen the validation images; the second keeps its own split; the third is recorded without images."""
    engine = make_engine(url)
    with engine.connect() as conn:
        command.upgrade(alembic_config(conn), "0005")
        conn.commit()
    drawn, own = dataset_folder(tmp_path / "drawn", 10), dataset_folder(tmp_path / "own", 6, splits=True)
    rows = {"ds_drawn000": drawn, "ds_own00000": own, "ds_gone0000": tmp_path / "gone"}
    with engine.begin() as conn:
        for ds_id, folder in rows.items():
            conn.execute(sa.text("INSERT INTO datasets (id, name, path, classes, num_images, num_boxes, splits, "
                                 "problems, created_at) VALUES (:id, 'd', :path, '[\"a\"]', 10, 10, '{}', '[]', :t)"),
                         {"id": ds_id, "path": str(folder), "t": T0})  # fmt: skip
        for ds_id, seed in (("ds_drawn000", 0), ("ds_drawn000", 1), ("ds_own00000", 1)):
            spec = {"kind": "train", "dataset": ds_id, "seed": seed, "val_split": 0.2}
            conn.execute(sa.text("INSERT INTO jobs (id, kind, state, spec, spec_sha256, attempts, cancel_requested, "
                                 "created_at, updated_at) VALUES (:id, 'train', 'succeeded', :spec, 'x', 1, false, "
                                 ":t, :t)"),
                         {"id": f"job_{ds_id[3:]}s{seed}", "spec": json.dumps(spec), "t": T0})  # fmt: skip
    engine.dispose()

    store = Store(url)
    try:
        data = load_coco(drawn)
        assert split(data, 0.2, 0) != split(data, 0.2, 1)  # the two jobs did validate on different images
        ds = store.get_dataset("ds_drawn000")
        assert (ds["val_split"], ds["split_seed"]) == (0.2, 0)
        assert ds["split"] == {"source": "drawn", "val_split": 0.2, "split_seed": 0, "train": 8, "val": 2, "test": 0}
        images = store.dataset_images("ds_drawn000")
        assert [im["image_id"] for im in images if im["split"] == "val"] == split(data, 0.2, 0)[1]
        assert [im["sha256"] for im in images] == [file_sha256(im["path"]) for im in data.images]
        assert store.get_job("job_drawn000s0")["split_draw"] is None  # it used the stored split
        assert store.get_job("job_drawn000s1")["split_draw"] == {"val_split": 0.2, "seed": 1}
        # As teachers: the seed-0 job trained on the stored training part, the seed-1 job on some validation images.
        saw = len(set(split(data, 0.2, 0)[1]) - set(split(data, 0.2, 1)[1]))
        assert saw > 0
        for seed, seen in ((0, 0), (1, saw)):
            job = JobSpec(kind="distill", dataset="ds_drawn000", teacher={"job": f"job_drawn000s{seed}"})
            assert teacher_overlap(job, ds, store)["seen"] == seen
        mine = store.get_dataset("ds_own00000")
        assert mine["split"] == {"source": "own", "val_split": None, "split_seed": None, "train": 4, "val": 1,
                                 "test": 1}  # fmt: skip
        assert store.get_job("job_own00000s1")["split_draw"] is None
        gone = store.get_dataset("ds_gone0000")
        assert gone["split"]["source"] == "drawn" and gone["split"]["val"] is None
        assert store.dataset_images("ds_gone0000") == []
    finally:
        store.close()
    assert schema_differences(url) == []

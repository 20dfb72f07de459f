"""The service's files by storage key (core.artifacts) on every backend: the embedded data folder, a shared folder
(``file://``) and S3 over HTTP (moto's server, the client code that talks to MinIO or AWS). Two ``Artifacts``
with separate data folders and one storage stand for two machines: what one publishes, the other reads whole
and verified; a folder is invisible until its manifest is written; a corrupted local copy is fetched again; a
run uploaded by one machine resumes on the other; deletion removes the stored bytes and the copies."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.artifacts import MANIFEST, Artifacts, checkpoint_key, dataset_key, model_key, run_key
from core.settings import Settings
from core.store import Store
from deploy.registry import read_model_json, verify_folder
from tests.s3_server import make_bucket, moto_server, s3_env
from tests.test_deploy_registry import make_export
from worker.publish import publish_model


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(params=["file", "s3"])
def machines(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Artifacts, ...]:
    """Two machines (their own data folders) on one storage: a shared folder, or an S3 bucket."""
    if request.param == "file":
        url = (tmp_path / "bucket").as_uri()
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        url = f"s3://{make_bucket(endpoint, request.node.name)}/ldd"
    a, b = (Artifacts(Settings(data_dir=tmp_path / name, storage_url=url)) for name in ("a", "b"))
    assert a.remote and b.remote
    return a, b


def _dataset(root: Path) -> dict[str, bytes]:
    files = {"annotations.json": b'{"images": []}', "images/1.jpg": b"\xff\xd8 one", "images/2.jpg": b"\xff\xd8 two"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_a_data_set_published_on_one_machine_is_read_whole_on_another(machines) -> None:
    a, b = machines
    key = dataset_key("ds_1")
    files = _dataset(a.staging(key))
    assert not b.exists(key)
    # Files without their manifest (an upload that died half-way) are no data set to a reader.
    a.storage.put_file(f"{key}/annotations.json", a.staging(key) / "annotations.json")
    assert not b.exists(key)
    with pytest.raises(FileNotFoundError, match="no folder"):
        b.tree(key)
    shas = a.publish_tree(key)
    assert set(shas) == set(files) and b.exists(key)
    got = b.tree(key)
    assert got.is_relative_to(b.settings.cache_dir) and not got.is_relative_to(a.settings.data_dir)
    assert {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()} == files


def test_a_corrupted_copy_is_detected_by_sha256_and_fetched_again(machines) -> None:
    a, b = machines
    key = dataset_key("ds_2")
    files = _dataset(a.staging(key))
    a.publish_tree(key)
    (b.tree(key) / "images" / "1.jpg").write_bytes(b"bit rot")
    again = Artifacts(b.settings, b.storage)  # a new process on machine b: it checks its copies again
    assert (again.tree(key) / "images" / "1.jpg").read_bytes() == files["images/1.jpg"]
    ck = checkpoint_key("ck_1")
    a.staging(ck).parent.mkdir(parents=True)
    a.staging(ck).write_bytes(b"weights" * 1000)
    a.publish_file(ck)
    b.file(ck).write_bytes(b"weights but damaged")
    assert b.file(ck).read_bytes() == b"weights" * 1000


def test_a_published_model_is_served_from_another_machines_verified_copy(machines, tmp_path: Path) -> None:
    a, b = machines
    store = Store(f"sqlite:///{tmp_path / 'ldd.db'}")
    try:
        export = make_export(tmp_path / "export", 2.0)
        row = publish_model(store, a, export, read_model_json(export), model_id="mdl_s3", job_id="job_s3")
        assert row["key"] == model_key("mdl_s3") and b.exists(row["key"])
        folder = b.tree(row["key"])
        assert verify_folder(folder)["id"] == "mdl_s3"  # model.onnx hashes to what model.json records
        # Publishing again (a retried attempt on a third machine) keeps the stored model as it is.
        c = Artifacts(Settings(data_dir=tmp_path / "c", storage_url=a.settings.storage_url))
        again = publish_model(store, c, make_export(tmp_path / "export2", 3.0), read_model_json(export),
                              model_id="mdl_s3", job_id="job_s3")  # fmt: skip
        assert again == row and read_model_json(c.tree(row["key"]))["sha256"] == row["meta"]["sha256"]
    finally:
        store.close()


def test_a_run_uploaded_at_its_checkpoint_resumes_on_another_machine(machines) -> None:
    a, b = machines
    run = a.settings.run_dir("job_r")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"iteration 4")
    (run / "train.log").write_text("epoch 1\n")
    (run / "progress.json").write_text('{"iter": 4}')  # this attempt's relay: stays on its machine
    assert sorted(a.push_run("job_r")) == [run_key("job_r", "checkpoints/last.pt"), run_key("job_r", "train.log")]
    assert a.push_run("job_r") == []  # nothing changed since
    (run / "checkpoints" / "last.pt").write_bytes(b"iteration 8")
    assert a.push_run("job_r") == [run_key("job_r", "checkpoints/last.pt")]
    fetched = b.pull_run("job_r")
    there = b.settings.run_dir("job_r")
    assert sorted(fetched) == [run_key("job_r", "checkpoints/last.pt"), run_key("job_r", "train.log")]
    assert (there / "checkpoints" / "last.pt").read_bytes() == b"iteration 8"
    assert not (there / "progress.json").exists()
    # A stale local checkpoint (this machine ran the job before) gives way to the stored one.
    (there / "checkpoints" / "last.pt").write_bytes(b"iteration 2")
    assert b.pull_run("job_r") == [run_key("job_r", "checkpoints/last.pt")]
    assert (there / "checkpoints" / "last.pt").read_bytes() == b"iteration 8"
    (run / "model.pt").write_bytes(b"final")
    (run / "metrics.json").write_text("{}")
    assert a.push_run("job_r")[-1] == run_key("job_r", "metrics.json")  # last: it says training finished
    assert b.file(run_key("job_r", "model.pt")).read_bytes() == b"final"  # a teacher given by job


def test_deleting_removes_the_stored_bytes_and_every_copy(machines) -> None:
    a, b = machines
    key = dataset_key("ds_3")
    _dataset(a.staging(key))
    a.publish_tree(key)
    copy = b.tree(key)
    before = a.usage("datasets")
    assert before > 0
    b.delete(key)
    assert not a.exists(key) and not copy.exists() and a.usage("datasets") == 0
    with pytest.raises(FileNotFoundError):
        Artifacts(a.settings, a.storage).tree(key)


def test_embedded_mode_is_the_data_folder_itself(tmp_path: Path) -> None:
    """No LDD_STORAGE_URL: a key is the path under the data folder; nothing is copied or cached."""
    art = Artifacts(Settings(data_dir=tmp_path / "ldd"))
    assert not art.remote and art.staging(dataset_key("ds_1")) == tmp_path / "ldd" / "datasets" / "ds_1"
    _dataset(art.staging(dataset_key("ds_1")))
    art.publish_tree(dataset_key("ds_1"))
    assert art.tree(dataset_key("ds_1")) == tmp_path / "ldd" / "datasets" / "ds_1"
    assert (
        not (tmp_path / "ldd" / "cache").exists() and not (tmp_path / "ldd" / "datasets" / "ds_1" / MANIFEST).exists()
    )
    assert art.push_run("job_x") == [] and art.pull_run("job_x") == []


def test_ping_says_whether_the_storage_answers(machines, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``/readyz``'s storage check: ok while it answers; the reason when nothing listens at the endpoint."""
    from bench.servers import free_port

    a, _ = machines
    assert a.ping() == "ok"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_MAX_ATTEMPTS": "1"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    gone = Artifacts(Settings(data_dir=tmp_path / "c", storage_url="s3://nobody/ldd"))
    assert gone.ping().startswith("unreachable")

"""Studies (issue 11): the plain student and each method over seeds, run as ordinary jobs, then a report.

- the report's numbers on hand-made job results (means, sample std, gains paired by seed with their 95% t
  interval worked by hand, significance = the interval excludes 0, figure 4 averages, failures, the recommended
  model) and its files;
- a study's plan and the bodies it refuses;
- on a store alone (no worker): refusals (a job check, the tenant's limit) store nothing, Idempotency-Key, a study
  cancelled while all its jobs are queued finishes at once, and jobs that ended without a worker's hook finish
  their study on the first read, once;
- end to end over HTTP (PostgreSQL store, Redis broker, a uvicorn API with torch blocked, two Celery workers):
  a tiny teacher trained by a job; a study cancelled while its first job runs (every job ends, the study is
  cancelled); a study of 2 methods (CrossKD; BCKD + Main LD) x 2 seeds followed with ``ldd studies watch`` (every
  row, gains, figure 4, a PNG chart, a recommended model that exists); a study whose distillation job fails for
  real (its teacher's file removed after submit) reporting the failure beside the row it could compute;
  idempotency, the tenant's active-job limit, and another tenant that sees none of it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from api.client import APIClientError, Client
from api.routes.studies import STUDY_EXAMPLES
from core import study_report
from core.checks import JobRefused
from core.settings import Settings
from core.store import Store
from core.studies import (
    PLAIN_ROW,
    StudyConflict,
    StudySpec,
    StudyTooBig,
    cancel,
    final_state,
    get_study,
    list_studies,
    plan,
    refresh,
    study_dir,
    submit,
)  # fmt: skip
from tests.api_server import ApiServer, coco_zip, private_redis_url
from tests.service_fixtures import WorkerProcess, postgres_database, wait_for
from worker.recovery import recover

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
KEYS = {"team-a": "key-a", "team-b": "key-b"}
ADMIN = "key-admin"
LIMIT = 8  # LDD_MAX_ACTIVE_JOBS: the main study (6 jobs) and the failing one (2) fit, a third study does not

# ----------------------------------------------------------------------------------------- the report


def job(row: str, seed: int, ap: float | None, state: str = "succeeded", box: list[float] | None = None,
        method: str | None = "ld") -> dict[str, Any]:  # fmt: skip
    metrics = None
    if ap is not None:
        metrics = {"bbox": {"AP": ap, "AP50": ap + 0.2, "AP75": ap - 0.1}}
        if box is not None:
            metrics["diagnostics"] = {"after": {"strides": [8, 16], "box_l1": box, "cls_l1": None,
                                                "box_l1_mean": sum(box) / 2, "cls_l1_mean": None}}  # fmt: skip
    return {"row": row, "method": None if row == PLAIN_ROW else method, "seed": seed, "job_id": f"job_{row}{seed}",
            "state": state, "metrics": metrics, "model_id": f"mdl_{row}{seed}" if ap is not None else None,
            "error": "training diverged" if state == "failed" else None}  # fmt: skip


def test_report_numbers_and_files(tmp_path: Path) -> None:
    plain = [0.30, 0.34, 0.32]
    ld = [0.40, 0.41, None]  # seed 2 failed
    weak = [0.31, 0.36, 0.33]
    members = [job(PLAIN_ROW, s, ap) for s, ap in enumerate(plain)]
    members += [job("ld", s, ap, box=[0.1 * (s + 1), 0.2]) if ap else job("ld", s, None, "failed")
                for s, ap in enumerate(ld)]  # fmt: skip
    members += [job("weak", s, ap, box=[0.5, 0.5], method="bckd") for s, ap in enumerate(weak)]
    report = study_report.build("st_0123456789abcdef", members)
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == [PLAIN_ROW, "ld", "weak"]

    assert rows[PLAIN_ROW]["AP"] == {"mean": statistics.mean(plain), "std": statistics.stdev(plain), "n": 3,
                                     "values": plain}  # fmt: skip
    assert rows[PLAIN_ROW]["gain"] is None and rows[PLAIN_ROW]["diagnostics"] is None
    assert rows["ld"]["AP"]["n"] == 2 and rows["ld"]["AP75"]["mean"] == pytest.approx(0.305)
    diffs = [0.40 - 0.30, 0.41 - 0.34]  # paired by seed; seed 2 has no pair
    assert rows["ld"]["gain"]["mean"] == pytest.approx(statistics.mean(diffs))
    assert rows["ld"]["gain"]["std"] == pytest.approx(statistics.stdev(diffs)) and rows["ld"]["gain"]["pairs"] == 2
    # Two pairs: t(0.975, 1) = 12.706, so +8.5 AP with sd 2.1 is +8.5 ± 19.1: the interval holds 0.
    assert rows["ld"]["gain"]["half_width"] == pytest.approx(12.7062 * statistics.stdev(diffs) / 2**0.5, rel=1e-4)
    assert rows["ld"]["significant"] is False
    assert rows["weak"]["significant"] is False  # +1.3 ± 1.4 (t(0.975, 2) = 4.303, sd 0.58)
    # Three pairs of +10, +11, +9 AP: +10 ± 4.303 * 1 / sqrt(3) = +10 ± 2.48, significant.
    kd_ap = [ap + d for ap, d in zip(plain, [0.10, 0.11, 0.09], strict=True)]
    strong = study_report.build(
        "st_s", [job(PLAIN_ROW, s, ap) for s, ap in enumerate(plain)] + [job("kd", s, ap) for s, ap in enumerate(kd_ap)]
    )
    kd = strong["rows"][1]
    assert kd["significant"] is True and kd["gain"]["half_width"] == pytest.approx(0.02484, abs=1e-5)
    assert (kd["gain"]["low"], kd["gain"]["high"]) == (
        pytest.approx(0.07516, abs=1e-5),
        pytest.approx(0.12484, abs=1e-5),
    )
    assert rows["ld"]["diagnostics"]["box_l1"] == pytest.approx([0.15, 0.2]) and rows["ld"]["diagnostics"]["seeds"] == 2
    assert rows["ld"]["diagnostics"]["cls_l1"] is None  # no class pairs: unknown, not 0
    assert rows["ld"]["best"] == {"seed": 1, "job_id": "job_ld1", "model_id": "mdl_ld1", "AP": 0.41}
    assert rows["ld"]["failed"] == [{"job_id": "job_ld2", "seed": 2, "state": "failed", "error": "training diverged"}]
    assert report["failures"] == [{"row": "ld", **rows["ld"]["failed"][0]}]
    assert report["recommended"] == {"row": "ld", "seed": 1, "job_id": "job_ld1", "model_id": "mdl_ld1", "AP": 0.41}

    # One seed: no spread to judge a gain by.
    single = study_report.build("st_x", [job(PLAIN_ROW, 0, 0.3), job("ld", 0, 0.5)])
    assert single["rows"][1]["gain"]["pairs"] == 1 and single["rows"][1]["significant"] is None
    # Nothing succeeded: every row is there, empty, and nothing is recommended.
    none = study_report.build("st_y", [job(PLAIN_ROW, 0, None, "cancelled"), job("ld", 0, None, "failed")])
    assert [r["AP"]["n"] for r in none["rows"]] == [0, 0] and none["recommended"] is None
    assert len(none["failures"]) == 2

    study = {"id": "st_0123456789abcdef", "name": "unit", "spec": {"seeds": 3}}
    study_report.write(tmp_path / "st", study, report)
    md = (tmp_path / "st" / "report.md").read_text()
    assert "| ld | 40.5 ± 0.7 | 60.5 ± 0.7 | 30.5 ± 0.7 | 2 | +8.5 ± 19.1 (sd 2.1) | [-10.6, +27.6] | no |" in md
    assert "| ld | ld | mdl_ld1 (seed 1) |" in md and "95% interval from Student's t" in md
    assert "mdl_ld1" in md and "job_ld2 failed" in md
    png = (tmp_path / "st" / "report.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 5000
    study_report.write(tmp_path / "st", study, none)  # a chart with no result draws too
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["report.md", "report.png"]  # no temporary left


def test_plan_and_refused_bodies() -> None:
    body = {"dataset": "ds_0123456789abcdef", "teacher": {"job": "job_0123456789abcdef"}, "seeds": 2,
            "methods": ["ld", {"name": "kd only", "distill": {"weights": {"main_ld": 0, "vlr_ld": 0}}}]}  # fmt: skip
    jobs = plan(StudySpec.model_validate(body))
    assert [(j.row, j.seed, j.spec.kind) for j in jobs] == [
        (PLAIN_ROW, 0, "train"), ("ld", 0, "distill"), ("kd only", 0, "distill"),
        (PLAIN_ROW, 1, "train"), ("ld", 1, "distill"), ("kd only", 1, "distill")]  # fmt: skip
    assert all(j.spec.seed == j.seed for j in jobs) and jobs[0].spec.teacher is None
    kd = jobs[2].spec.distill
    assert kd is not None and (kd.weights.value("main_ld"), kd.weights.value("main_kd")) == (0.0, 1.0)
    for bad in (
        {"methods": []},
        {"methods": ["ld", "ld"]},
        {"methods": [{"name": PLAIN_ROW}]},
        {"seeds": 11},
        {"methods": ["ld"] * 9},
        {"dataset": "/data/mine"},
        {"methods": ["nope"]},
        {"path": "/x"},
    ):
        with pytest.raises(ValidationError):
            StudySpec.model_validate({**body, **bad})
    for example in STUDY_EXAMPLES.values():  # the OpenAPI document's examples are bodies that pass
        assert len(plan(StudySpec.model_validate(example["value"]))) == 3 * 5
    assert final_state({"cancel_requested": False}, ["succeeded", "running"]) == "running"
    assert final_state({"cancel_requested": True}, ["succeeded", "cancelled"]) == "cancelled"
    assert final_state({"cancel_requested": False}, ["succeeded", "failed", "cancelled"]) == "failed"


def test_store_level_all_or_nothing_cancel_and_finish_without_worker(tmp_path: Path) -> None:
    """What the API does when no worker is involved (SQLite store): refusals store nothing, a cancelled study of
    queued jobs is finished at once with its report, and a study whose jobs ended elsewhere is finished by the
    first reader, once."""
    settings = Settings.from_env({"LDD_DATA_DIR": str(tmp_path / "data"), "LDD_MAX_ACTIVE_JOBS": "5"})
    settings.make_dirs()
    store = Store(settings.store_url)
    try:
        (settings.datasets_dir / "ds_0123456789abcdef").mkdir()
        store.add_dataset("ds_0123456789abcdef", "d", "datasets/ds_0123456789abcdef", ["a"], 4, 4, {}, [])
        teacher = settings.checkpoints_dir / "ckpt_0123456789abcdef.pt"
        teacher.write_bytes(b"the check only needs the file to exist; facts come from the row")
        facts = {"kind": "detector", "reg_max": 16, "strides": [8, 16, 32, 64, 128], "num_classes": 1, "classes": ["a"]}
        store.add_checkpoint("ckpt_0123456789abcdef", "checkpoints/ckpt_0123456789abcdef.pt", facts, "t")
        body = {"dataset": "ds_0123456789abcdef", "teacher": {"checkpoint": "ckpt_0123456789abcdef"},
                "student": {"arch": "gfl_tiny"}, "methods": ["ld", "bckd"], "seeds": 1}  # fmt: skip

        with pytest.raises(StudyTooBig):  # 2 seeds x 3 rows = 6 > 5
            submit(store, settings, StudySpec.model_validate({**body, "seeds": 2}))
        with pytest.raises(JobRefused, match="row 'ld', seed 0: teacher: no checkpoint"):
            submit(store, settings, StudySpec.model_validate({**body, "teacher": {"checkpoint": "ckpt_00000000"}}))
        assert list_studies(store) == [] and store.list_jobs() == []  # nothing of either was stored

        study, created, job_ids = submit(store, settings, StudySpec.model_validate(body), idempotency_key="k")
        assert created and len(job_ids) == 3 and study["state"] == "running"
        assert submit(store, settings, StudySpec.model_validate(body), idempotency_key="k")[:3:2] == (study, [])
        with pytest.raises(StudyConflict):
            submit(store, settings, StudySpec.model_validate({**body, "methods": ["ld"]}), idempotency_key="k")
        assert {store.get_job(j)["study_id"] for j in job_ids} == {study["id"]}
        assert [j["study_id"] for j in store.list_jobs()] == [study["id"]] * 3

        done = cancel(store, settings, study["id"])  # every job was queued: cancelled at once, then finished
        assert done["state"] == "cancelled" and done["finished_at"] is not None
        assert {store.get_job(j)["state"] for j in job_ids} == {"cancelled"}
        assert [f["error"] for f in done["report"]["failures"]] == ["cancelled before it started"] * 3
        assert refresh(store, settings, study["id"]) == done  # finished once: later reads change nothing
        files = study_dir(settings, study["id"])
        assert (files / "report.png").read_bytes().startswith(PNG)
        assert "| bckd | bckd |" in (files / "report.md").read_text()

        # Jobs that end without a worker's hook (here: claimed and failed directly).
        other, _, ids = submit(store, settings, StudySpec.model_validate({**body, "seeds": 1, "name": "b"}))
        for i, job_id in enumerate(ids):
            assert refresh(store, settings, other["id"])["state"] == "running"
            assert recover(store, settings)["studies_finished"] == []
            store.claim(job_id, "elsewhere", 30)
            store.finish(job_id, "elsewhere", "failed", error=f"broke {i}")
        # Nobody reads it: the workers' recovery sweep finishes it (report written), once.
        assert recover(store, settings)["studies_finished"] == [other["id"]]
        assert recover(store, settings)["studies_finished"] == []
        finished = get_study(store, other["id"])
        assert finished is not None and (study_dir(settings, other["id"]) / "report.md").is_file()
        assert finished["state"] == "failed" and [f["error"] for f in finished["report"]["failures"]] == [
            "broke 0", "broke 1", "broke 2"]  # fmt: skip
    finally:
        store.close()


# ----------------------------------------------------------------------------------------- over HTTP


def schedule(epochs: int) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": 4, "image_size": [128, 96], "num_workers": 0, "warmup_iters": 2,
            "lr": 0.01}  # fmt: skip


class Workers(list):
    """Two workers on one queue (a study's jobs are ordinary jobs: any worker takes any of them)."""

    def log_tail(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.log_tail()}" for w in self)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("studies")
    with postgres_database() as store_url:
        env = {"LDD_DATA_DIR": str(tmp / "data"), "LDD_STORE_URL": store_url, "LDD_BROKER_URL": private_redis_url(),
               "LDD_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()), "LDD_ADMIN_KEYS": f"ops:{ADMIN}",
               "LDD_MAX_ACTIVE_JOBS": str(LIMIT), "LDD_LEASE_SECONDS": "20", "LDD_HEARTBEAT_SECONDS": "1",
               "LDD_PROGRESS_SECONDS": "0.5", "LDD_KILL_GRACE_SECONDS": "3"}  # fmt: skip
        api = ApiServer(env, tmp).start()
        workers = Workers(WorkerProcess(env, tmp / f"worker{i}.log").start() for i in range(2))
        try:
            yield api, workers, tmp
        finally:
            for w in workers:
                w.kill_all()
            api.stop()


def ldd(url: str, key: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LDD_API_KEY": key, "LDD_URL": url}
    return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def wait_study(c: Client, study_id: str, timeout: float, worker: Workers) -> dict[str, Any]:
    try:
        return wait_for(lambda: (s := c.get_study(study_id))["state"] != "running" and s, timeout,
                        f"study {study_id} to end", 0.5)  # fmt: skip
    except TimeoutError:
        raise AssertionError(f"{c.get_study(study_id)}\n{worker.log_tail()}") from None


def test_studies_over_http(service: Any) -> None:
    api, worker, tmp = service
    a, b, admin = (Client(api.url, api_key=k, timeout=60) for k in (KEYS["team-a"], KEYS["team-b"], ADMIN))
    ds = a.upload_dataset(coco_zip(tmp / "ds.zip", n=6, size=(128, 96)), name="tiny")
    teacher = a.submit_job({"kind": "train", "name": "teacher", "dataset": ds["id"], "student": {"arch": "gfl_tiny"},
                            "schedule": schedule(1)})  # fmt: skip
    done = a.wait(teacher["id"], timeout=300, poll=0.5)
    assert done["state"] == "succeeded", (done["error"], worker.log_tail())
    assert done["study_id"] is None
    base = {"dataset": ds["id"], "teacher": {"job": teacher["id"]}, "student": {"arch": "gfl_tiny"},
            "schedule": schedule(1)}  # fmt: skip

    # All or nothing: a job that fails the check refuses the whole study, naming its row.
    with pytest.raises(APIClientError) as refused:
        a.submit_study({**base, "methods": ["ld"], "teacher": {"job": "job_0000000000000000"}})
    assert refused.value.status == 404 and "row 'ld', seed 0" in refused.value.message
    assert a.list_studies() == [] and len(a.list_jobs()) == 1

    # Cancelled while its first job runs: every job ends, the study says cancelled, its report says why.
    c_study = a.submit_study({**base, "name": "to cancel", "methods": ["ld"], "seeds": 1, "schedule": schedule(300)})
    assert c_study["state"] == "running" and [j["row"] for j in c_study["jobs"]] == [PLAIN_ROW, "ld"]
    assert {j["state"] for j in c_study["jobs"]} <= {"queued", "running"}  # a worker may have claimed one already
    wait_for(lambda: a.get_study(c_study["id"])["jobs"][0]["state"] == "running", 120, "the first job to start")
    a.cancel_study(c_study["id"])
    cancelled = wait_study(a, c_study["id"], 30, worker)
    assert cancelled["state"] == "cancelled" and {j["state"] for j in cancelled["jobs"]} == {"cancelled"}
    assert {f["state"] for f in cancelled["report"]["failures"]} == {"cancelled"}
    assert cancelled["report"]["recommended"] is None
    with pytest.raises(APIClientError) as again:
        a.cancel_study(c_study["id"])
    assert again.value.status == 409

    # The main study: 2 methods x 2 seeds (+ the plain student), with an idempotency key; a combination row.
    combo = {"name": "bckd+main-ld", "distill": {"method": "bckd", "weights": {"main_ld": 0.25}}}
    spec = {**base, "name": "which method", "seeds": 2, "methods": ["crosskd", combo]}
    study = a.submit_study(spec, idempotency_key="study-1")
    assert study["progress"] == {"jobs": 6, "ended": 0} and study["report"] is None
    assert a.submit_study(spec, idempotency_key="study-1")["id"] == study["id"]  # replayed, nothing new
    with pytest.raises(APIClientError) as conflict:
        a.submit_study({**spec, "seeds": 1}, idempotency_key="study-1")
    assert conflict.value.status == 422 and conflict.value.details["study_id"] == study["id"]
    with pytest.raises(APIClientError) as too_many:  # 6 active + 3 > LIMIT
        a.submit_study({**base, "methods": ["ld", "tbr"], "seeds": 1})
    assert too_many.value.status == 429 and too_many.value.details["needed"] == 3
    member = a.get_job(study["jobs"][1]["job_id"])
    assert member["study_id"] == study["id"] and member["kind"] == "distill" and member["spec"]["seed"] == 0
    combo_job = a.get_job(study["jobs"][2]["job_id"])["spec"]["distill"]
    assert combo_job["method"] == "bckd" and combo_job["weights"]["main_ld"] == 0.25 > combo_job["weights"]["vlr_ld"]

    # The failing study: its teacher is an uploaded checkpoint whose file is gone by the time its job runs.
    ck = a.upload_checkpoint(tmp / "data" / "runs" / teacher["id"] / "model.pt", name="teacher.pt")
    (tmp / "f.json").write_text(json.dumps({**base, "name": "failing", "teacher": {"checkpoint": ck["id"]},
                                            "methods": ["ld"], "seeds": 1}))  # fmt: skip
    out = ldd(api.url, KEYS["team-a"], "studies", "submit", str(tmp / "f.json"))
    assert out.returncode == 0, out.stderr
    failing = json.loads(out.stdout)
    for f in (tmp / "data" / "checkpoints").glob(f"{ck['id']}*"):
        f.unlink()

    # Another tenant sees none of it; an admin sees it all.
    assert b.list_studies() == [] and {s["id"] for s in admin.list_studies()} >= {study["id"], failing["id"]}
    for call in (lambda: b.get_study(study["id"]), lambda: b.cancel_study(study["id"]),
                 lambda: b.study_report(c_study["id"]), lambda: b.get_job(study["jobs"][0]["job_id"]),
                 lambda: b.submit_study(spec, idempotency_key="study-1")):  # fmt: skip
        with pytest.raises(APIClientError) as hidden:
            call()
        assert hidden.value.status == 404

    # ``ldd studies watch`` follows the main study to its end and prints the table.
    out = ldd(api.url, KEYS["team-a"], "studies", "watch", study["id"], timeout=400)
    assert out.returncode == 0, (out.stdout, out.stderr, worker.log_tail())
    lines = out.stderr.splitlines()
    assert len(lines) >= 2 and lines[-1] == f"study {study['id']} succeeded: 6/6 jobs ended", out.stderr
    final = a.get_study(study["id"])
    report = final["report"]
    assert final["state"] == "succeeded" and final["finished_at"] and report["failures"] == []
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == [PLAIN_ROW, "crosskd", "bckd+main-ld"]
    assert [r["method"] for r in report["rows"]] == [None, "crosskd", "bckd"]
    aps = {(j["row"], j["seed"]): j["AP"] for j in final["jobs"]}
    for name, r in rows.items():
        assert r["AP"]["n"] == 2 and r["AP"]["mean"] == pytest.approx((aps[name, 0] + aps[name, 1]) / 2)
        assert r["best"]["AP"] == max(aps[name, 0], aps[name, 1])
        if name != PLAIN_ROW:
            assert r["gain"]["pairs"] == 2 and isinstance(r["significant"], bool)
            assert r["gain"]["mean"] == pytest.approx(r["AP"]["mean"] - rows[PLAIN_ROW]["AP"]["mean"])
            assert r["diagnostics"]["strides"] == [8, 16, 32, 64, 128] and len(r["diagnostics"]["box_l1"]) == 5
    # Every job validated on the data set's one split: the teacher's AP in the report is its AP there, as its own
    # job measured it; it was trained on the training part, so it saw none of the validation images.
    assert report["teacher_AP"] == pytest.approx(done["metrics"]["bbox"]["AP"], abs=1e-9)
    assert report["teacher_overlap"]["seen"] == 0 and report["teacher_overlap"]["teacher_job"] == teacher["id"]
    rec = report["recommended"]
    assert rec["AP"] == max(r["best"]["AP"] for r in rows.values())
    assert a.get_model(rec["model_id"])["job_id"] == rec["job_id"]
    png = a.study_report(study["id"], chart=True)
    assert png.startswith(PNG) and len(png) > 1000
    md = ldd(api.url, KEYS["team-a"], "studies", "report", study["id"], "--chart", str(tmp / "chart.png"))
    assert md.returncode == 0 and md.stdout in out.stdout and (tmp / "chart.png").read_bytes() == png
    assert all(f"| {name} |" in md.stdout for name in rows) and rec["model_id"] in md.stdout

    # The failing study reports its failure beside the row it could compute.
    failed = wait_study(a, failing["id"], 120, worker)
    assert failed["state"] == "failed", failed
    frows = {r["row"]: r for r in failed["report"]["rows"]}
    assert frows[PLAIN_ROW]["AP"]["n"] == 1 and frows["ld"]["AP"]["n"] == 0 and frows["ld"]["gain"] is None
    (failure,) = failed["report"]["failures"]
    assert failure["row"] == "ld" and failure["state"] == "failed" and "gone from the server" in failure["error"]
    assert failed["report"]["recommended"]["row"] == PLAIN_ROW
    assert "gone from the server" in a.study_report(failing["id"]).decode()

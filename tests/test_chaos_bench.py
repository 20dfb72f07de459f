"""The pure helpers of the chaos bench (``bench/chaos.py`` and its ``chaos_*`` modules): how it reads run
folders and REST observations into its figures, how it sizes the work from a measured step time and times
its disruptions by the jobs' progress, and how it keeps the verdict apart from disruptions that found no
moment (the bench itself runs the real stack and is not run here)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def chaos():
    """The bench's modules, imported as the bench imports them: ``bench/`` first on the path."""
    sys.path.insert(0, str(BENCH))
    try:
        yield SimpleNamespace(figures=importlib.import_module("chaos_figures"),
                              report=importlib.import_module("chaos_report"),
                              servers=importlib.import_module("servers"))  # fmt: skip
    finally:
        sys.path.remove(str(BENCH))


def line(it: int, t: float, resumed: int | None = None, phase: str = "train") -> dict:
    return {"phase": phase, "iter": it, "time": t, "resumed_from_iter": resumed, "total_iters": 12, "epochs": 3}


def test_parse_child_log(chaos):
    text = "\n=== 2025-03-04 05:06:07 attempt 1: train\nloss 1.0\n=== 2025-03-04 05:06:37 attempt 2: ONNX export\n"
    (t1, a1, w1), (t2, a2, w2) = chaos.figures.parse_child_log(text)
    assert (a1, w1, a2, w2) == (1, "train", 2, "ONNX export")
    assert t2 - t1 == 30 and time.localtime(t1).tm_hour == 5


def test_one_trainer_with_a_resume_and_a_fresh_start_is_not_interleaved(chaos):
    # attempt 1 reaches iter 3 with no checkpoint (killed in epoch 1); attempt 2 starts again at 0,
    # checkpoints at 4 and is killed at 6; attempt 3 resumes from 4.
    lines = [line(0, 0), line(3, 1), line(0, 2), line(4, 3), line(6, 4), line(4, 5, 4), line(8, 6, 4), line(12, 7, 4)]
    assert chaos.figures.interleaved_writers(lines) == []


def test_two_trainers_at_once_are_caught(chaos):
    # the old attempt keeps writing (5, 6) while the new one resumed from 4 writes (4, 5)
    lines = [line(0, 0), line(4, 1), line(5, 2), line(4, 3, 4), line(6, 4), line(5, 5, 4)]
    assert chaos.figures.interleaved_writers(lines) == [5]


def test_epochs_repeated(chaos):
    lines = [line(0, 0), line(4, 10), line(6, 20), line(4, 31, 4), line(12, 40, 4), line(12, 41, 4, "done")]
    got = chaos.figures.epochs_repeated(lines, t_gone=30.0, per_epoch=4)
    assert got == {"at_iter": 6, "resumed_from": 4, "repeated": 0.5, "trained_after": 8}
    # killed after training (in export): nothing trained again
    assert chaos.figures.epochs_repeated(lines, t_gone=45.0, per_epoch=4)["trained_after"] == 0
    # no checkpoint to resume: everything before the kill is trained again
    fresh = [line(0, 0), line(3, 10), line(0, 31), line(12, 40)]
    assert chaos.figures.epochs_repeated(fresh, t_gone=30.0, per_epoch=4)["repeated"] == 0.75


def test_last_error_line(chaos):
    log = (
        "2026-11-30 19:57:26,848 INFO ldd.worker: job job_1: succeeded\n"
        "2026-11-30 19:57:26,848 CRITICAL celery.worker.request: Couldn't ack '99', reason:network:ConnectionError\n"
        'Traceback (most recent call last):\n  File "x.py", line 1\nredis.exceptions.ConnectionError: refused\n'
        "2026-11-30 19:57:30,000 WARNING ldd.recovery: re-sent lost broker messages for job_2\n"
    )
    assert chaos.figures.last_error_line(log).endswith(
        "CRITICAL celery.worker.request: Couldn't ack '99', reason:network:ConnectionError"
    )
    assert chaos.figures.last_error_line("2026-11-30 19:57:30,000 INFO fine\n") is None


def test_next_progress(chaos):
    def seen(t, state, attempts, it, ptime):
        return (t, (state, attempts, "train", it, ptime))

    history = [seen(1, "running", 1, 2, 0.9), seen(5, "running", 1, 4, 4.8),  # the killed attempt
               seen(6, "running", 1, 4, 4.8 + 0.0), seen(18, "queued", 1, 4, 4.8), seen(20, "running", 2, 4, 4.8),
               seen(26, "running", 2, 4, 25.5), seen(40, "succeeded", 2, 12, 39)]  # fmt: skip
    assert chaos.figures.next_progress(history, t=5.5, min_attempts=2) == 26  # not the claim at 20: no progress yet
    assert chaos.figures.next_progress(history, t=30, min_attempts=2) == 40  # the end counts
    # a relay done before the disruption but seen after it is not progress after it
    assert chaos.figures.next_progress([seen(6, "running", 1, 4, 4.8), seen(9, "running", 1, 5, 8.5)], t=5) == 9


def test_job_children(chaos, tmp_path):
    runs = tmp_path / "runs"
    job = "job_0123456789abcdef"
    table = {
        10: (1, ["/v/bin/python", "-m", "worker", "--name", "chaos0"]),
        11: (10, ["/v/bin/python", "-m", "worker", "--name", "chaos0"]),  # its pool
        12: (11, ["/v/bin/python", "-m", "distill", "train", f"{runs}/{job}/spec.json", "--out", f"{runs}/{job}"]),
        13: (12, ["/v/bin/python", "-m", "distill", "train", f"{runs}/{job}/spec.json", "--out", f"{runs}/{job}"]),
        14: (11, ["/v/bin/python", "-m", "worker.export", f"{runs}/job_ff00ff00ff00ff00/model.pt", "x"]),
        15: (1, ["tail", "-f", f"{runs}/{job}/train.log"]),  # not a python child of an attempt
    }
    assert chaos.figures.job_children(table, runs) == {
        12: (job, "train", 11),
        14: ("job_ff00ff00ff00ff00", "export", 11),
    }
    assert sorted(chaos.servers.descendants(10, table)) == [11, 12, 13, 14]


def result(jobs: list[dict], rows: list[dict]) -> dict:
    settings = {
        "jobs": len(jobs),
        "epochs": 3,
        "teacher_epochs": 2,
        "train_images": 24,
        "image_size": [128, 96],
        "workers": 2,
        "lease_seconds": 10.0,
        "heartbeat_seconds": 1,
        "recover_seconds": 2,
        "max_attempts": 3,
        "outage_s": 3.0,
        "plan": sorted({r["kind"] for r in rows} - {"rescue"}),
        "seed": 0,
        "quick": False,
    }
    return {
        "settings": settings,
        "teachers": ["job_" + "0" * 16],
        "jobs": jobs,
        "disruptions": rows,
        "registry_leftovers": [],
        "unattributed_folders": [],
        "rest_failures": 0,
        "minutes": {"total": 1.0, "teachers": 0.5, "chaos": 0.5},
    }


def a_job(job: str, **over) -> dict:
    return {
        "job": job,
        "index": 0,
        "state": "succeeded",
        "attempts": 1,
        "models_store": 1,
        "models_registry": 1,
        "twice_proc": [],
        "twice_progress": [],
        "children": [],
        "child_log": [],
        "owners": [],
        "kills": [],
        "seconds": 60.0,
        **over,
    }


def test_verdict_and_report(chaos):
    kill = {
        "kind": "train",
        "job": "job_" + "a" * 16,
        "attempt": 1,
        "at": "train, iter 9/18",
        "t": 100.0,
        "down_s": 0.1,
        "orphans": 0,
        "job_state": "running",
        "requeued_s": 10.5,
        "claimed_s": 11.0,
        "running_again_s": 11.2,
        "recovery_s": 30.0,
        "at_iter": 9,
        "resumed_from": 6,
        "repeated": 0.5,
    }
    good = result([a_job(kill["job"], attempts=2, kills=["train"]), a_job("job_" + "b" * 16)], [kill])
    assert chaos.report.verdict(good) == (True, [])
    md = chaos.report.render(good)
    assert "**Verdict: PASS.**" in md and "| jobs that ran twice at once | 0 | 0 |" in md
    assert "running again after 11.2 s; next progress record after 30.0 s" in md
    assert "Provenance:" not in md  # none recorded: report.save adds it
    good["provenance"] = {"commit": "0123456789ab", "date": "2026-12-07T22:00:00Z", "machine": "a CPU, 2 CPUs",
                          "load": {"start": [6.3, 3.0, 1.3], "end": [9.7, 6.0, 2.7]}}  # fmt: skip
    assert "\nProvenance: commit 0123456789ab, date 2026-12-07T22:00:00Z, machine a CPU" in chaos.report.render(good)

    rescue = (
        {"kind": "redis", "job": None, "at": "SIGKILL", "t": 200.0, "down_s": 3.0, "affected": [], "recovery_s": None},
        {
            "kind": "rescue",
            "job": None,
            "at": "2 job(s) queued and none running for 90 s",
            "t": 300.0,
            "down_s": 5.0,
            "affected": ["job_" + "b" * 16],
            "recovery_s": 40.0,
        },
    )
    bad = result([a_job(kill["job"], models_registry=2, twice_progress=[7]), a_job("job_" + "b" * 16)], [kill, *rescue])
    ok, problems = chaos.report.verdict(bad)
    assert not ok
    assert any("without exactly one model" in p for p in problems) and any("ran twice" in p for p in problems)
    assert any(p.startswith("a worker stopped taking jobs (2 job(s) queued") for p in problems)
    assert "**Verdict: FAIL.**" in chaos.report.render(bad)


@pytest.fixture(scope="module")
def faults(chaos):
    """``chaos_faults``: how the bench times its disruptions and sizes its work (``chaos`` put bench/ on the path)."""
    return importlib.import_module("chaos_faults")


def test_step_seconds(chaos):
    lines = [line(0, 10.0), line(3, 11.5), line(6, 13.0), line(12, 16.0), line(12, 20.0, phase="done")]
    assert chaos.figures.step_seconds(lines) == pytest.approx(0.5)  # the eval and done records are not steps
    assert chaos.figures.step_seconds([line(0, 10.0)]) is None
    assert chaos.figures.step_seconds([line(0, 10.0, phase="eval"), line(12, 16.0, phase="done")]) is None


def test_epochs_sized_from_the_measured_step(faults):
    # 6 steps per epoch, 25 s of training aimed at: a fast machine gets more epochs, a slow one the floor
    assert faults.size_epochs(0.1, 6, 25.0, 3) == 42  # 0.6 s epochs
    assert faults.size_epochs(0.5, 6, 25.0, 3) == 9
    assert faults.size_epochs(2.0, 6, 25.0, 3) == 3  # 12 s epochs: the floor, 36 s of training
    assert faults.size_epochs(0.001, 6, 25.0, 3) == 200  # capped
    assert faults.size_epochs(None, 6, 25.0, 2) == 2  # not measured
    for step in (0.05, 0.2, 0.7, 1.3):  # every epoch count trains at least the time aimed at
        e = faults.size_epochs(step, 6, 25.0, 2)
        assert e * 6 * step >= 25.0 and (e - 1) * 6 * step < 25.0 or e == 2


def test_every_target_in_the_window_is_reported_before_training_ends(faults):
    """The fastest machine reports only at epoch ends (each step shorter than the report interval): every
    target the window offers is still met by a record that is due, for any number of epochs."""
    for per_epoch, epochs in ((6, 2), (6, 3), (24, 2), (1, 5), (6, 42)):
        total = per_epoch * epochs
        lo, hi = faults.strike_window(per_epoch, total)
        records = [{"phase": "train", "iter": k * per_epoch, "total_iters": total} for k in range(epochs + 1)]
        for target in range(lo, hi + 1):
            hits = [r["iter"] for r in records if faults.due(r, target)]
            assert hits and min(hits) < total
            assert target >= per_epoch  # after the first epoch's checkpoint: the kill exercises the resume
    assert faults.strike_window(6, 6) is None  # one epoch: no epoch end between the first and the last
    assert not faults.due({"phase": "train", "iter": 18, "total_iters": 18}, 12)  # training over
    assert not faults.due({"phase": "eval", "iter": 12, "total_iters": 18}, 12)
    assert not faults.due({}, 0)


def test_jobs_are_held_back_for_the_disruptions_to_come(faults):
    """10 jobs, 9 planned disruptions: the gate keeps a fresh job for every disruption that has not struck,
    and lets one go when the armed disruption has no running job to strike or Redis is down."""

    def gate(submitted: int, struck: int, starving: bool = False, release: bool = False) -> bool:
        return faults.may_submit(10 - submitted - 1, 9 - struck, starving, release)

    assert gate(0, 0)  # 9 left for the 9 to come
    assert not gate(1, 0)  # a second job now would leave 8 for 9
    assert gate(1, 0, starving=True) and gate(1, 0, release=True)
    assert gate(1, 1) and not gate(2, 1)
    assert gate(9, 9)  # the plan is through: the rest go in
    # the whole run, one disruption after the other, never the gate's fault that a disruption finds no job
    submitted = 0
    for struck in range(9):
        while gate(submitted, struck) and submitted < 10:
            submitted += 1
        assert 10 - submitted >= 9 - struck - 1  # a fresh job left for each disruption after this one
        if submitted < 10 and gate(submitted, struck, starving=True):
            submitted += 1  # the armed one had nothing to strike: it gets one


def test_a_disruption_without_a_moment_is_reported_apart_from_the_verdict(chaos):
    kill = {"kind": "train", "job": "job_" + "a" * 16, "attempt": 1, "at": "train, iter 6/18", "t": 100.0,
            "down_s": 0.1, "orphans": 0, "job_state": "running", "recovery_s": 20.0, "running_again_s": 11.0,
            "at_iter": 6, "resumed_from": 6, "repeated": 0.0}  # fmt: skip
    res = result([a_job(kill["job"], attempts=2, kills=["train"]), a_job("job_" + "b" * 16)], [kill])
    res["settings"]["plan"] = ["train", "api", "train"]
    assert chaos.report.verdict(res) == (True, [])  # the invariants held for what struck
    assert sorted(chaos.report.missing_moments(res)) == ["api", "train"]
    md = chaos.report.render(res)
    assert "**Verdict: PASS.**" in md
    assert "**Disruptions: 1 of 3 planned found their moment.** No moment found for: train, api" in md
    res["settings"]["plan"] = ["train"]
    assert chaos.report.missing_moments(res) == []
    assert "**Disruptions: 1 of 1 planned found their moment.**\n" in chaos.report.render(res)
    # and a broken invariant still fails, whatever the moments
    res["jobs"][1]["state"] = "failed"
    assert chaos.report.verdict(res)[0] is False


def test_first_attempt(chaos):
    lines = [line(0, 0), line(4, 1), line(6, 2), line(4, 3, 4), line(12, 4, 4)]
    assert chaos.report.first_attempt(lines) == lines[:3]
    assert chaos.report.first_attempt(lines[:3]) == lines[:3]


def test_a_kill_in_training_lands_inside_an_epoch_and_before_training_ends(faults):
    # seen due at an epoch end (12 of 36, 6 per epoch), teacher step 0.2 s: up to one epoch later
    assert faults.strike_delay(0.5, 12, 36, 6, 0.2) == pytest.approx(0.6)
    assert faults.strike_delay(0.9, 12, 36, 6, 0.2) < 6 * 0.2
    # near the end: never past the last step at the measured (lower-bound) step time
    for it in range(30, 36):
        assert it + faults.strike_delay(0.99, it, 36, 6, 0.2) / 0.2 < 36
    assert faults.strike_delay(0.5, 35, 36, 6, 0.2) == 0.0  # the last step: at once
    assert faults.strike_delay(0.5, 12, 36, 6, None) == 0.0  # not measured: at the record


def test_machine_figures_read_every_machine(chaos, tmp_path):
    """With object storage each worker machine has its own runs folder: the attempt children are found under any
    of them, the models in the bucket are those with their manifest, and the last iteration a client saw before
    a lost machine comes from the REST history."""
    runs = [tmp_path / "machines" / m / "runs" for m in ("m0", "m1")]
    job = "job_0123456789abcdef"
    table = {
        10: (1, ["/v/bin/python", "-m", "worker", "--name", "chaos-m1"]),
        12: (
            10,
            ["/v/bin/python", "-m", "distill", "train", f"{runs[1]}/{job}/spec.json", "--out", f"{runs[1]}/{job}"],
        ),
        13: (1, ["/v/bin/python", "-m", "distill", "train", f"{tmp_path}/elsewhere/runs/{job}/spec.json"]),
    }
    assert chaos.figures.job_children(table, runs) == {12: (job, "train", 10)}
    assert chaos.figures.job_children(table, runs[0]) == {}

    keys = ["models/m1/model.onnx", "models/m1/.manifest.json", "models/m2/model.onnx", "models/m1x/.manifest.json",
            "runs/job_1/checkpoints/last.pt"]  # fmt: skip
    assert chaos.figures.stored_models(keys) == (["m1", "m1x"], ["m2"])  # m2: an upload cut short

    def seen(t, it, phase="train"):
        return (t, ("running", 1, phase, it, t - 0.5))

    history = [seen(1, 0), seen(2, 6), seen(3, 9), seen(6, 6), seen(7, 12, "eval")]
    assert chaos.figures.reported_before(history, 5.0) == 9
    assert chaos.figures.reported_before(history, 1.0) is None


def test_a_lost_machine_keeps_its_progress_for_the_figures(chaos, tmp_path):
    """``Stack.lose_machine`` deletes the machine's data folder but keeps its runs' progress records and logs aside;
    the job's progress is then read across machines in time order, so the epochs repeated are measured."""
    stack_mod = importlib.import_module("chaos_stack")
    stack = stack_mod.Stack(tmp_path / "root", 1, {}, storage="s3")
    try:
        job = "job_0123456789abcdef"
        stack.machines, stack.machine = ["m0"], ["m0"]
        run0 = stack.machine_dir("m0") / "runs" / job
        (run0 / "checkpoints").mkdir(parents=True)
        (run0 / "checkpoints" / "last.pt").write_bytes(b"weights")
        (run0 / "progress.jsonl").write_text("".join(f'{{"phase": "train", "iter": {i}, "time": {t}}}\n'
                                                     for i, t in ((0, 1), (6, 2), (9, 3))))  # fmt: skip
        assert stack.lose_machine(0) == [f"{job}/progress.jsonl"]
        assert not stack.machine_dir("m0").exists() and stack.lost == ["m0"]
        stack.machines, stack.machine = ["m0", "m1"], ["m1"]
        run1 = stack.machine_dir("m1") / "runs" / job
        run1.mkdir(parents=True)
        resumed = ('{"phase": "train", "iter": 6, "time": 10, "resumed_from_iter": 6}\n'
                   '{"phase": "train", "iter": 12, "time": 11, "resumed_from_iter": 6}\n')  # fmt: skip
        (run1 / "progress.jsonl").write_text(resumed)
        lines = stack_mod.progress_lines(stack, job)
        assert [ln["iter"] for ln in lines] == [0, 6, 9, 6, 12]
        assert chaos.figures.interleaved_writers(lines) == []
        assert chaos.figures.epochs_repeated(lines, t_gone=5.0, per_epoch=6)["repeated"] == 0.5
        assert stack.registry_dir(0) == tmp_path / "root" / "machines" / "m1" / "cache" / "models"
    finally:
        stack.http.close()
        subprocess.run(["rm", "-rf", str(stack.pg_root)], check=False)


def test_a_lost_machine_in_the_report(chaos):
    lost = {"kind": "machine", "job": "job_" + "a" * 16, "attempt": 1, "at": "train, iter 9/18", "t": 100.0,
            "down_s": 0.2, "orphans": 0, "job_state": "running", "requeued_s": 11.0, "claimed_s": 11.5,
            "running_again_s": 13.0, "recovery_s": 25.0, "at_iter": 16, "resumed_from": 6, "repeated": 1.67,
            "per_epoch": 6, "uploaded_iter": 6, "local_checkpoint_iter": 12, "machine_lost": "m0",
            "machine_joined": "m2", "resumed_on": "m1", "fetched_files": 4, "checkpoint_uploaded": False,
            "rest_iter_at_kill": 15}  # fmt: skip
    res = result([a_job(lost["job"], attempts=2, kills=["machine"]), a_job("job_" + "b" * 16)], [lost])
    res["settings"]["storage"] = "s3"
    # More than an epoch again, but from the checkpoint that was in the bucket: the newest was not uploaded yet.
    assert chaos.report.verdict(res) == (True, [])
    md = chaos.report.render(res)
    assert "| recovery after a lost worker machine in training (S3) | running again after 13.0 s; next progress " \
           "record after 25.0 s |" in md  # fmt: skip
    assert "| lost machines whose job resumed from the checkpoint in the bucket | 1 of 1 | 1 of 1 |" in md
    assert "| epochs repeated per lost machine (max; of which the upload lag) | 1.67 (1.00) |" in md
    assert "stored model folders" in md and "- machine m0 lost with aaaaaaaa at iter 16" in md
    assert "its newest checkpoint was NOT in the bucket" in md and "resumed on m1 from iter 6, 4 run file(s)" in md
    assert "each lost machine's job resumed from the checkpoint in the bucket." in md
    lost.update(resumed_from=0, repeated=2.67)  # started over: not resumed from the bucket
    ok, problems = chaos.report.verdict(res)
    assert not ok and problems == [
        f"lost machines whose job did not resume from the checkpoint in the bucket: {lost['job']}"
    ]
    assert "**Verdict: FAIL.**" in chaos.report.render(res)

"""The pure helpers of the chaos bench (``bench/chaos.py`` and its ``chaos_*`` modules): how it reads run
folders and REST observations into its figures (the bench itself runs the real stack and is not run here)."""

from __future__ import annotations

import importlib
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
        "load_avg": (1.0, 1.0, 1.0),
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

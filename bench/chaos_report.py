"""The chaos bench's results: ``collect`` turns what the observers saw, the store's tables and the run
folders into the figures (``chaos.json``), ``verdict`` checks them and ``render`` writes ``chaos.md``.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import Counter
from typing import Any

import chaos_machine as lost  # the machine disruption's figures
from chaos_client import IMAGE_SIZE, Submitter
from chaos_faults import SERVICES, Disruption
from chaos_figures import (
    TERMINAL,
    epochs_repeated,
    first_after,
    fmt,
    interleaved_writers,
    md_table,
    next_progress,
    parse_child_log,
    seconds,
    step_seconds,
)
from chaos_stack import Stack, progress_lines, run_texts
from chaos_watch import Watcher
from report import provenance_line


def first_attempt(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``progress.jsonl`` lines of a job's first attempt: up to where the iterations first go back."""
    for i in range(1, len(lines)):
        if (lines[i].get("iter") or 0) < (lines[i - 1].get("iter") or 0):
            return lines[:i]
    return lines


def round_or_none(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def missing_moments(res: dict[str, Any]) -> list[str]:
    """The planned disruptions that found no moment (each kind as many times as it is missing)."""
    left = Counter(res["settings"]["plan"]) - Counter(r["kind"] for r in res["disruptions"])
    return [k for k, n in left.items() for _ in range(n)]


def collect(
    stack: Stack,
    watcher: Watcher,
    submitter: Submitter,
    disruptions: list[Disruption],
    teacher_ids: list[str],
    args: argparse.Namespace,
    t_start: float,
    t_teachers: float,
    t_end: float,
) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(stack.store_url) as conn:
        jobs = {
            r[0]: {"state": r[1], "attempts": r[2], "model_id": r[3], "error": r[4], "last_error": r[5]}
            for r in conn.execute("SELECT id, state, attempts, model_id, error, last_error FROM jobs")
        }
        models = conn.execute("SELECT id, job_id, key FROM models").fetchall()
    model_rows: dict[str, int] = {}
    for _id, job_id, _path in models:
        model_rows[job_id] = model_rows.get(job_id, 0) + 1
    # A registry folder (with s3: a stored model folder) belongs to the job whose model row points at it; a folder
    # no row points at is a model published outside the bookkeeping (a second copy, or one the store never heard of).
    folders, leftovers, unattributed = lost.registry_counts(stack, models)

    children: dict[str, list[dict[str, Any]]] = {}
    for c in watcher.children.values():
        children.setdefault(c["job"], []).append(c)
    per_job = []
    for s in submitter.submitted:
        j_id = s["id"]
        lines = progress_lines(stack, j_id)
        headers = sorted({h for text in run_texts(stack, j_id, "worker_child.log") for h in parse_child_log(text)})
        owners = [o for _, _, _, o in watcher.sql.get(j_id, []) if o]
        per_job.append({
            "job": j_id, "index": s["index"], **jobs.get(j_id, {}),
            "models_store": model_rows.get(j_id, 0), "models_registry": folders.get(j_id, 0),
            "twice_proc": [t for t in watcher.twice if t["job"] == j_id],
            "twice_progress": interleaved_writers(lines),
            "children": sorted(children.get(j_id, []), key=lambda c: c["first"]),
            "child_log": headers, "owners": list(dict.fromkeys(owners)),
            "kills": [d.kind for d in disruptions if d.job == j_id],
            "seconds": seconds(s["t_post"], (watcher.rest.get(j_id) or [(None, None)])[-1][0]),
            "step_s": round_or_none(step_seconds(first_attempt(lines)), 3),
        })  # fmt: skip

    rows = []
    for d in disruptions:
        row: dict[str, Any] = {"kind": d.kind, "job": d.job, "attempt": d.attempt, "at": d.at, "t": d.t,
                               "down_s": seconds(d.t, d.t_back), **d.extra}  # fmt: skip
        if d.job is not None:
            hist = watcher.sql.get(d.job, [])
            requeued = first_after([t for t, st, _, _ in hist if st == "queued"], d.t)
            claimed = first_after([t for t, st, a, _ in hist if st == "running" and a > (d.attempt or 0)], d.t)
            new_child = first_after([c["first"] for c in children.get(d.job, [])], d.t_back or d.t)
            progress = next_progress(watcher.rest.get(d.job, []), d.t, (d.attempt or 0) + 1)
            lines = progress_lines(stack, d.job)
            p_last = lines[-1] if lines else {}
            per_epoch = max(1, (p_last.get("total_iters") or 1) // max(1, p_last.get("epochs") or 1))
            row.update(requeued_s=seconds(d.t, requeued), claimed_s=seconds(d.t, claimed),
                       child_s=seconds(d.t, new_child), recovery_s=seconds(d.t, progress),
                       # running again: its next child started (or it ended, if nothing was left to run)
                       running_again_s=seconds(d.t, new_child if new_child is not None else progress),
                       per_epoch=per_epoch, **epochs_repeated(lines, d.t_back or d.t, per_epoch))  # fmt: skip
            resumed = re.findall(r"resumed from .* at iteration (\d+)", "".join(run_texts(stack, d.job, "train.log")))
            row["train_log_resumes"] = list(dict.fromkeys(int(x) for x in resumed))
            if d.kind == "machine":
                row.update(lost.machine_figures(stack, watcher, row, d.t_back or d.t))
        else:
            # Recovered when every job it touched (running then, or submitted meanwhile) showed progress again.
            watched = d.affected + d.extra.get("submitted_while_down", [])
            times = {j: next_progress(watcher.rest.get(j, []), d.t, 0) for j in watched}
            row["progress_s"] = {j: seconds(d.t, t) for j, t in times.items()}
            row["recovery_s"] = (seconds(d.t, max(times.values())) if times and None not in times.values()
                                 else None)  # fmt: skip
            row["affected"] = watched
            attempts_then = {j: next((a for t, _, a, _ in reversed(watcher.sql.get(j, [])) if t <= d.t), 0)
                             for j in d.affected}  # fmt: skip
            row["attempts_lost"] = sum(1 for j in d.affected
                                       if any(st == "queued" and t > d.t and a >= attempts_then[j]
                                              for t, st, a, _ in watcher.sql.get(j, [])))  # fmt: skip
            if d.extra.get("submitted_while_down"):
                late = d.extra["submitted_while_down"][0]
                claimed = first_after([t for t, st, _, _ in watcher.sql.get(late, []) if st == "running"], d.t)
                row["submitted_claimed_after_back_s"] = seconds(d.t_back, claimed)
        rows.append(row)
    return {
        "settings": {"jobs": args.jobs, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                     "train_images": args.images, "image_size": list(IMAGE_SIZE), "workers": len(stack.workers),
                     "lease_seconds": args.lease, "heartbeat_seconds": 1, "recover_seconds": 2, "max_attempts": 3,
                     "outage_s": args.outage, "plan": list(args.plan), "seed": args.seed, "quick": args.quick,
                     "storage": stack.storage},
        "teachers": teacher_ids, "jobs": per_job, "disruptions": rows, "registry_leftovers": leftovers,
        "unattributed_folders": unattributed,
        "rest_failures": len(watcher.rest_failures),
        "minutes": {"total": round((t_end - t_start) / 60, 1), "teachers": round((t_teachers - t_start) / 60, 1),
                    "chaos": round((t_end - t_teachers) / 60, 1)},
    }  # fmt: skip


def verdict(res: dict[str, Any]) -> tuple[bool, list[str]]:
    jobs, rows = res["jobs"], res["disruptions"]
    problems = []
    if bad := [j["job"] for j in jobs if j.get("state") != "succeeded"]:
        problems.append(f"jobs not succeeded: {', '.join(bad)}")
    if bad := [j["job"] for j in jobs if (j["models_store"], j["models_registry"]) != (1, 1)]:
        problems.append(f"jobs without exactly one model: {', '.join(bad)}")
    if res["unattributed_folders"]:
        problems.append(f"registry folders without a model row: {', '.join(res['unattributed_folders'])}")
    if bad := [j["job"] for j in jobs if j["twice_proc"] or j["twice_progress"]]:
        problems.append(f"jobs that ran twice at once: {', '.join(bad)}")
    if bad := [r["job"] for r in rows if r["job"] and r["kind"] != "machine" and r.get("repeated", 0) > 1]:
        problems.append(f"kills that repeated more than one epoch: {', '.join(bad)}")
    problems += lost.machine_problems(rows)  # a lost machine: resumed from the bucket's checkpoint
    if bad := [r["job"] for r in rows if r.get("orphans")]:
        problems.append(f"children that outlived their killed worker: {', '.join(bad)}")
    if bad := [
        r["kind"]
        for r in rows
        if r.get("recovery_s") is None
        and r.get("job_state") not in TERMINAL
        and r["kind"] != "rescue"
        and (r["job"] or r.get("affected"))
    ]:
        problems.append(f"disruptions without recovery: {', '.join(bad)}")
    for r in rows:
        if r["kind"] == "rescue":
            errors = "; ".join(f"worker {k}'s last error: {v}" for k, v in (r.get("last_errors") or {}).items() if v)
            problems.append(f"a worker stopped taking jobs ({r['at']}{'; ' + errors if errors else ''})")
    # A planned disruption that found no moment is not judged here (missing_moments): it tested nothing.
    return not problems, problems


def render(res: dict[str, Any]) -> str:
    s, jobs, rows = res["settings"], res["jobs"], res["disruptions"]
    n = len(jobs)
    ok, problems = verdict(res)
    kills = [r for r in rows if r["job"] and r["kind"] != "machine"]  # process kills (a machine: machine_head)
    s3, n_kills = s.get("storage") == "s3", sum(bool(r["job"]) for r in rows)

    def stat(kind: str, key: str = "recovery_s") -> str:
        xs = [r[key] for r in rows if r["kind"] == kind and r.get(key) is not None]
        if not xs:
            return "-"
        if len(xs) == 1:
            return f"{xs[0]:.1f} s"
        return f"{statistics.median(xs):.1f} s median, {max(xs):.1f} s max (n={len(xs)})"

    def kill_stat(kind: str, then: str) -> str:
        if not any(r["kind"] == kind for r in rows):
            return "-"
        return f"running again after {stat(kind, 'running_again_s')}; {then} after {stat(kind)}"

    succeeded = sum(j.get("state") == "succeeded" for j in jobs)
    one_model = sum((j["models_store"], j["models_registry"]) == (1, 1) for j in jobs)
    twice = sum(bool(j["twice_proc"] or j["twice_progress"]) for j in jobs)
    repeated = [r.get("repeated", 0.0) for r in kills]
    held = [text for text, holds in [
        (f"all {n} jobs succeeded", succeeded == n), ("each published exactly one model", one_model == n),
        ("none ran twice at once", twice == 0),
        (f"no kill cost more than one epoch (at most {max(repeated, default=0):.2f})", max(repeated, default=0) <= 1),
    ] if holds]  # fmt: skip
    head = [
        ["jobs that succeeded", f"{succeeded} of {n}", f"{n} of {n}"],
        [f"jobs with exactly one model (store rows / {'stored model folders' if s3 else 'registry folders'})",
         f"{one_model} of {n} ({sum(j['models_store'] for j in jobs)} rows, {sum(j['models_registry'] for j in jobs)} "
         "folders)", f"{n} of {n}"],
        ["jobs that ran twice at once", str(twice), "0"],
        ["epochs repeated per worker kill (max)", f"{max(repeated):.2f}" if repeated else "-", "<= 1"],
        ["recovery after a worker kill in training", kill_stat("train", "next progress record"),
         f"lease ({s['lease_seconds']:g} s) + start-up"],
        ["recovery after a lost worker machine in training (S3)", kill_stat("machine", "next progress record"),
         f"lease ({s['lease_seconds']:g} s) + start-up" if s3 else ""],
        *lost.machine_head(rows, f"the upload lag (at the next {s['heartbeat_seconds']} s heartbeat)"),
        ["recovery after a worker kill in export", kill_stat("export", "ended (the export starts over)"), ""],
        ["recovery after a worker kill in publish", kill_stat("publish", "ended"), ""],
        ["recovery after a Redis restart (next progress)", stat("redis"), ""],
        ["recovery after a PostgreSQL restart (next progress)", stat("postgres"), ""],
        ["recovery after an API restart (next progress)", stat("api"), ""],
    ]  # fmt: skip
    missing = missing_moments(res)
    planned = len(s["plan"])
    prov, timing = res.get("provenance"), res.get("timing") or {}
    steps = [j["step_s"] for j in jobs if j.get("step_s") is not None]
    out = [
        "# Chaos: reliability under failures",
        "",
        f"`python bench/chaos.py{' --quick' if s.get('quick') else ''}`: {n} distillation jobs (gfl_tiny student "
        f"from {len(res['teachers'])} teacher job(s), gfl_tiny{' and gfl_small' if len(res['teachers']) > 1 else ''}; "
        f"{s['train_images']} train images of {s['image_size'][0]}x{s['image_size'][1]}, {s['epochs']} epochs) on "
        f"the bench's own Redis (append-only) + PostgreSQL + {s['workers']} `python -m worker` processes + the API "
        f"(uvicorn){lost.S3_SETUP if s3 else ''}, submitted over REST, at most {s['workers']} at a time. "
        f"Lease {s['lease_seconds']:g} s, heartbeat "
        f"{s['heartbeat_seconds']} s, recovery loop every {s['recover_seconds']} s, at most {s['max_attempts']} "
        f"attempts. {res['minutes']['total']} min in all ({res['minutes']['teachers']} min for the teachers).",
        "",
        provenance_line(prov) if prov else "",
        "",
        "Work sized on this machine: the gfl_tiny teacher trained at "
        f"{fmt(timing.get('step_s'))} s per step ({timing.get('per_epoch')} steps per epoch) and exported in "
        f"{fmt(timing.get('export_s'))} s, so each distillation job got {timing.get('epochs')} epochs to train about "
        f"{fmt(timing.get('train_s'))} s (at least {s.get('min_epochs', s['epochs'])} epochs; planned "
        f"{fmt(timing.get('planned_train_s'))} s at the teacher's step). The distillation steps took "
        + (f"{statistics.median(steps):.3f} s (median of {len(steps)} jobs' first attempts)." if steps else "-.")
        + " Disruptions strike at points of the jobs' own progress, and jobs go in only as the plan can use them.",
        "",
        f"**Verdict: {'PASS' if ok else 'FAIL'}.** "
        + (
            "Every job succeeded and published exactly one model; no job "
            "ran twice at once; no kill cost more than one epoch"
            + ("; each lost machine's job resumed from the checkpoint in the bucket." if len(kills) < n_kills else ".")
            if ok
            else "; ".join(problems) + "."
        ),
        "" if ok or not held else f"Held: {'; '.join(held)}.",
        "",
        f"**Disruptions: {planned - len(missing)} of {planned} planned found their moment.**"
        + (
            f" No moment found for: {', '.join(missing)} (not part of the verdict, which judges what struck; "
            "a disruption that did not strike tested nothing)."
            if missing
            else ""
        ),
        "",
        md_table(["figure", "measured", "expected"], head),
        "",
        "## Disruptions",
        "",
        "A worker kill SIGKILLs the worker's main process only, as the OOM killer would; its pool process and "
        "the training or export child must die with it (*gone*: when the last of them was gone; *orphans*: "
        "those still alive 15 s later). The worker is then started again. *requeued*: the store puts the job back "
        "in the queue (its lease expired); *claimed*: a worker takes it again; *running again*: the next attempt's "
        "child process starts. Redis is SIGKILLed (its append-only file kept) the moment a job's export child exits, "
        "so that the job's worker acknowledges it and the next job is submitted while the broker is down. "
        "PostgreSQL is stopped with `pg_ctl -m immediate` (a crash: recovery runs when it starts) while jobs "
        "train. Both stay down for the time shown (*down*). The API "
        "is SIGKILLed and started again at once; *down* is until it answers. *recovery*: until `GET /v1/jobs` shows "
        "a progress record written after the disruption (or the end) of every job it touched: the killed job; "
        "or the jobs training at the time and those submitted during the outage (a job in export writes no "
        "progress records until it ends, so it is not timed). *epochs repeated*: "
        "the last iteration reported before the kill minus the iteration the next attempt resumed from, over the "
        "iterations per epoch. Times in seconds from the disruption."
        + (lost.MACHINE_LOST if any(r["kind"] == "machine" for r in rows) else ""),
        "",
        md_table(
            [
                "#",
                "disruption",
                "job(s)",
                "where",
                "down",
                "gone",
                "orphans",
                "requeued",
                "claimed",
                "running again",
                "recovery",
                "iter at kill",
                "resumed from",
                "epochs repeated",
            ],
            [
                [
                    i + 1,
                    r["kind"],
                    (r["job"] or "")[-8:] or ", ".join(j[-8:] for j in r.get("affected", [])),
                    r["at"],
                    None if r["job"] else r["down_s"],
                    r["down_s"] if r["job"] else None,
                    r.get("orphans"),
                    r.get("requeued_s"),
                    r.get("claimed_s"),
                    r.get("running_again_s"),
                    r.get("recovery_s"),
                    r.get("at_iter"),
                    r.get("resumed_from"),
                    r.get("repeated"),
                ]
                for i, r in enumerate(rows)
            ],
        ),  # fmt: skip
        "",
    ]
    notes = []
    for r in rows:
        if r["kind"] == "publish":
            notes.append(
                f"- publish kill on {r['job'][-8:]} ({r['at']}): the store then had {r.get('model_rows')} "
                f"model row(s) for it and the job was {r.get('job_state')}."
            )
        if r["kind"] in ("export", "publish") and r.get("trained_after"):
            notes.append(f"- {r['kind']} kill on {r['job'][-8:]}: {r['trained_after']} iterations trained again.")
        if (
            r["kind"] == "train"
            and r.get("train_log_resumes")
            and r.get("resumed_from") is not None
            and r["resumed_from"] not in r["train_log_resumes"]
        ):
            notes.append(
                f"- train kill on {r['job'][-8:]}: progress.jsonl says resumed from {r['resumed_from']}, "
                f"train.log {r['train_log_resumes']}."
            )
        if r["kind"] == "machine":
            notes.append(lost.machine_note(r))
        if r["kind"] == "redis" and r.get("affected") is not None:
            late = r.get("submitted_while_down") or []
            notes.append(
                f"- Redis: {len(late)} job(s) submitted while it was down"
                + (
                    f"; the first was claimed {fmt(r.get('submitted_claimed_after_back_s'))} s after Redis "
                    "came back (its message was re-sent by the recovery loop)"
                    if late
                    else ""
                )
                + "."
            )
        if r["kind"] == "rescue":
            for slot, line in (r.get("last_errors") or {}).items():
                notes.append(
                    f"- the watchdog restarted worker {slot} ({r['at']}); an idle worker normally claims a "
                    f"queued job within seconds. Its last error before: `{line or 'none'}`."
                )
        if r["kind"] in SERVICES and r.get("attempts_lost"):
            notes.append(f"- {r['kind']}: {r['attempts_lost']} running job(s) lost their attempt (lease) and resumed.")
    if res["registry_leftovers"]:
        notes.append(
            f"- registry: {len(res['registry_leftovers'])} hidden temporary folder(s) left by killed "
            f"publishers ({', '.join(res['registry_leftovers'])}); never listed or served."
        )
    if notes:
        out += ["Notes:", "", *notes, ""]
    out += [
        "## Jobs",
        "",
        md_table(
            [
                "job",
                "state",
                "attempts",
                "kills",
                "store rows",
                "registry folders",
                "children seen",
                "two alive at once",
                "progress goes back",
                "submit to end (s)",
                "s per step",
            ],
            [
                [
                    j["job"][-8:],
                    j.get("state"),
                    j.get("attempts"),
                    ", ".join(j["kills"]) or "-",
                    j["models_store"],
                    j["models_registry"],
                    len(j["children"]),
                    len(j["twice_proc"]),
                    len(j["twice_progress"]),
                    j["seconds"],
                    j.get("step_s"),
                ]
                for j in jobs
            ],
        ),  # fmt: skip
        "",
        '## How "ran twice at once" is decided',
        "",
        "The store cannot show it by itself: the lease is one column changed by conditional UPDATEs, so it names "
        "one owner at any time (the owners seen are in chaos.json, one per attempt). What must not happen is that "
        "the process of a lost attempt keeps working while the next one runs. Every attempt does its work in child "
        "processes (`python -m distill train runs/<job>/spec.json`, then the export) whose command line names the "
        "job's run folder; the bench scans `/proc` every 0.2 s and counts a job as run twice when one scan finds two "
        "such children of it alive (*two alive at once*). A kill's children die within milliseconds while the next "
        "attempt starts only after the lease expires, so a scan would see an overlap of any length that matters. "
        "Independently, and without sampling, `progress.jsonl` is read afterwards: one trainer only moves forward, "
        "and a new attempt goes back only to the iteration it says it resumed from (or 0 without a checkpoint); two "
        "trainers appending at once would interleave and go back without saying so (*progress goes back*).",
    ]
    return "\n".join(out) + "\n"

"""The paper's tables 5 and 6 on BCCD: LD on every dense detector family, and teachers across families.

    python bench/heads.py                                   # the whole table: ~30 CPU runs (hours on 2 cores)
    python bench/heads.py --families fcos --cross none      # one family: teacher + 2 rows x 3 seeds
    python bench/heads.py --families retina --epochs 2 --teacher-epochs 8 --image-size 192 144
    python bench/heads.py --teacher retina=RUN/model.pt     # reuse a trained teacher of that family

For each family of ``--families`` (retina, fcos, atss, gflv2): a teacher ``<family>_small`` is trained once
(``--teacher-epochs``, a longer schedule, so that it leads the student by >= 5 AP), then the student
``<family>_tiny`` alone and with Main KD + Main LD + VLR LD from that teacher (``DistillSpec()``'s defaults,
method ``ld``), each over ``--seeds`` seeds. The cross-family rows (``--cross``): an ATSS teacher -> a GFL
student, and a RetinaNet teacher (9 anchors per location) -> an FCOS student (``distill.anchor_match``), each
against that student family's own student alone. Every run goes through ``distill.train.run`` (the service's
code path) on BCCD (``shared/data/bccd-voc``: 292 trainval photos -> 72 test photos), as the ablation
(``bench/ablation_plan.py``: data, one run, the job body), judged by the comparison engine the studies use
(``core.comparison``: gain paired by seed, 95% interval from Student's t; the goal "+2 AP" is met when the gain
is >= 2 AP and its interval excludes 0, "inside noise" when the mean reaches it but the interval includes 0).

Writes ``bench/results/heads_bccd.{json,md,png}`` (``--out``) with their provenance and the settings that ran:
a reduced run (fewer families, epochs or seeds than the defaults) says so in its title and in ``reduced``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ablation_plan import Plan, job_spec, prepare_data, run_job, worker_init
from report import RESULTS, save

from core import comparison

FAMILIES = ("retina", "fcos", "atss", "gflv2")
CROSS = {"atss->gfl": ("atss", "gfl"), "retina->fcos": ("retina", "fcos")}  # teacher family, student family
DISTILLED = "e"  # the ablation's row "Main KD + Main LD + VLR LD" (DistillSpec's defaults)
ALONE = "a"
METHOD = "Main KD + Main LD + VLR LD"
# The BCCD regime of the ablation (bench/ablation.py --dataset bccd; bench/results/ablation_bccd.md): the
# teacher's lead comes from its longer schedule and its 4x parameters.
NOTES = "## Notes (written by hand after the run)"  # kept by --regenerate
DEFAULTS = {"image_size": (256, 192), "epochs": 4, "teacher_epochs": 36, "lr": 0.01, "seeds": 3}


def alone_name(family: str) -> str:
    return f"{family}_tiny alone"


def distilled_name(student: str, teacher: str) -> str:
    return f"{student}_tiny + {METHOD} ({teacher}_small teacher)"


def plan_for(base: Plan, student: str, teacher: str | None = None) -> Plan:
    return replace(base, student_arch=f"{student}_tiny", teacher_arch=f"{teacher or student}_small")


Group = tuple[str, str, str]  # (title, student family, teacher family)


def summarise(runs: dict[str, dict[int, dict]], groups: list[Group]) -> dict[str, Any]:
    """The rows in the ablation's layout: ``rows[id]`` = ``name``, ``family`` (the student's), ``teacher`` (None
    for the student alone), ``AP`` / ``AP50`` / ``AP75`` {``mean``, ``std``, ``n``, ``values``}, ``seeds``,
    ``gain`` (over that family's student alone, paired by seed, with its 95% interval), ``significant`` and
    ``verdict_2AP``; ``runs``: row name -> seed -> the run's metrics."""
    rows: dict[str, Any] = {}
    for title, student, teacher in groups:
        names = {alone_name(student): None, distilled_name(student, teacher): teacher}
        per_seed = {n: {s: r["bbox"] for s, r in runs.get(n, {}).items()} for n in names}
        for c in comparison.compare(per_seed, alone_name(student)):
            rows[f"{title}: {c['row']}"] = {"name": c["row"], "group": title, "family": student,
                                            "teacher": names[c["row"]], **c,
                                            "verdict_2AP": comparison.verdict(c, 0.02)}  # fmt: skip
    return rows


def markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    reduced = summary["reduced"]
    lines = [
        "# LD on every dense detector family (paper tables 5 and 6) on BCCD" + (" (REDUCED RUN)" if reduced else ""),
        "",
        f"Trained on the 292 BCCD trainval photos, evaluated on the 72 test photos. Images {s['image_size'][0]}x"
        f"{s['image_size'][1]}, batch {s['batch']}, students `<family>_tiny` {s['epochs']} epochs at lr {s['lr']}, "
        f"teachers `<family>_small` {s['teacher_epochs']} epochs at lr {s['teacher_lr']}; {s['seeds']} seeds; "
        f"distillation = DistillSpec() defaults (method ld: {METHOD}). Whole run {summary['wall_s'] / 60:.1f} min.",
    ]
    if summary.get("kept_runs"):
        lines += [
            "",
            f"Runs reused from an earlier invocation with the same settings: {', '.join(summary['kept_runs'])}.",
        ]
    if reduced:
        lines += ["", f"**Reduced run**: {reduced}. Not the full table; read the numbers as this run's only."]
    lines += ["", "Teachers (trained once in this run, or reused):", ""]
    for fam, t in summary["teachers"].items():
        src = f"reused from {t['reused_from']}" if t.get("reused_from") else f"{t.get('wall_s', '?')} s"
        src = "trained by an earlier invocation, reused" if t.get("wall_s") == "kept" else src
        lines.append(f"- `{fam}_small`: AP {100 * t['bbox']['AP']:.1f}, AP50 {100 * t['bbox']['AP50']:.1f} ({src})")
    for title in dict.fromkeys(r["group"] for r in summary["rows"].values()):
        rows = [{**r, "row": r["name"]} for r in summary["rows"].values() if r["group"] == title]
        lines += ["", f"## {title}", "", *comparison.table(rows)]
        teacher = summary["teachers"].get(rows[-1]["teacher"] or "")
        if teacher and rows[0]["AP"]["mean"] is not None:  # the table asks for a teacher >= 5 AP ahead
            lead = 100 * (teacher["bbox"]["AP"] - rows[0]["AP"]["mean"])
            lines.append(f"\nTeacher `{rows[-1]['teacher']}_small` leads the student alone by {lead:+.1f} AP.")
        for r in rows[1:]:
            lines.append(f"\n{r['name']}: goal +2 AP over the student alone: **{r['verdict_2AP']}**.")
    lines += ["", comparison.CAPTION]
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [{**r, "row": f"{r['group']}: {r['name']}"} for r in summary["rows"].values()]
    fig = Figure(figsize=(max(9, 1.3 * len(rows)), 5), dpi=110)
    comparison.draw(fig.subplots(), rows, "LD per detector family (BCCD)")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of " + ", ".join(FAMILIES))
    p.add_argument("--cross", default=",".join(CROSS), help="comma-separated, of " + ", ".join(CROSS) + "; or none")
    p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--teacher-epochs", type=int, default=DEFAULTS["teacher_epochs"])
    p.add_argument("--image-size", type=int, nargs=2, default=DEFAULTS["image_size"], metavar=("W", "H"))
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--teacher", action="append", default=[], help="FAMILY=PATH: reuse this teacher checkpoint")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", default="heads_bccd")
    p.add_argument(
        "--keep", action="store_true", help="reuse finished runs in --work (same settings: the caller's care)"
    )
    p.add_argument("--regenerate", action="store_true", help="re-render bench/results/<out>.md|png from its .json")
    args = p.parse_args(argv)
    if args.regenerate:
        summary = json.loads((RESULTS / f"{args.out}.json").read_text())
        notes = (RESULTS / f"{args.out}.md").read_text().partition(NOTES)
        md_path = save(args.out, summary, markdown(summary) + (f"\n{NOTES}{notes[2]}" if notes[1] else ""))
        chart(summary, md_path.with_suffix(".png"))
        print(md_path.read_text())
        return 0
    families = [f for f in args.families.split(",") if f]
    cross = [] if args.cross == "none" else [c for c in args.cross.split(",") if c]
    if unknown := [f for f in families if f not in FAMILIES] + [c for c in cross if c not in CROSS]:
        p.error(f"unknown families or cross rows: {unknown}")
    base = Plan(dataset="bccd", seeds=args.seeds, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                image_size=tuple(args.image_size), lr=args.lr, teacher_lr=args.lr, warmup_iters=100, jobs=args.jobs,
                threads=args.threads, device=args.device)  # fmt: skip
    reused = {k: Path(v) for k, v in (t.split("=", 1) for t in args.teacher)}
    teachers_needed = list(dict.fromkeys(families + [CROSS[c][0] for c in cross]))
    students_needed = list(dict.fromkeys(families + [CROSS[c][1] for c in cross]))
    groups: list[Group] = [(f, f, f) for f in families] + [(c, CROSS[c][1], CROSS[c][0]) for c in cross]
    changed: dict[str, Any] = {}  # what differs from the full table, said in the results
    if families != list(FAMILIES):
        changed["families"] = ", ".join(families) or "none"
    if cross != list(CROSS):
        changed["cross rows"] = ", ".join(cross) or "none"
    changed.update(
        {k: getattr(args, k) for k in ("seeds", "epochs", "teacher_epochs") if getattr(args, k) != DEFAULTS[k]}
    )
    if tuple(args.image_size) != DEFAULTS["image_size"]:
        changed["image_size"] = "x".join(map(str, args.image_size))
    reduced = "; ".join(f"{k} {v}" for k, v in changed.items())

    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="ld-heads-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(base, work)
    runs_dir = work / args.out
    print(f"data: {data_dir}; runs: {runs_dir}; reduced: {reduced or 'no'}", flush=True)
    runs: dict[str, dict[int, dict]] = {}
    teachers: dict[str, dict] = {}
    kept: list[str] = []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(base.jobs, mp_context=ctx, initializer=worker_init, initargs=(base.threads,)) as pool:

        def submit(spec: dict[str, Any], name: str) -> Future:
            done = runs_dir / name / "metrics.json"
            if args.keep and done.exists():  # a finished run of an earlier invocation with the same settings
                kept.append(name)
                fut: Future = Future()
                fut.set_result({**json.loads(done.read_text()), "spec": spec, "wall_s": "kept"})
                return fut
            shutil.rmtree(runs_dir / name, ignore_errors=True)  # every run here starts afresh
            return pool.submit(run_job, spec, str(runs_dir / name), base.device)

        t_futures = {
            f: submit(job_spec(plan_for(base, f), data_dir, None, 0, None), f"teacher-{f}")
            for f in teachers_needed
            if f not in reused
        }
        futures: dict[tuple[str, int], Future] = {
            (alone_name(f), seed): submit(job_spec(plan_for(base, f), data_dir, ALONE, seed, None), f"{f}-alone-{seed}")
            for seed in range(base.seeds)
            for f in students_needed
        }
        for f in teachers_needed:
            if f in reused:
                teachers[f] = {
                    **json.loads((reused[f].parent / "metrics.json").read_text()),
                    "reused_from": str(reused[f]),
                }
            else:
                teachers[f] = t_futures[f].result()
            print(f"teacher {f}_small: {teachers[f]['bbox']}", flush=True)
        for _, student, teacher in groups:
            path = reused.get(teacher, runs_dir / f"teacher-{teacher}" / "model.pt")
            for seed in range(base.seeds):
                spec = job_spec(plan_for(base, student, teacher), data_dir, DISTILLED, seed, path)
                futures[(distilled_name(student, teacher), seed)] = submit(spec, f"{student}-from-{teacher}-{seed}")
        for (name, seed), fut in futures.items():
            result = fut.result()
            runs.setdefault(name, {})[seed] = result
            print(f"{name} seed {seed}: AP {result['bbox']['AP']:.4f} ({result['wall_s']} s)", flush=True)

    summary = {
        "settings": {**asdict(base), "families": families, "cross": cross},
        "reduced": reduced or None,
        "teachers": {
            f: {"bbox": t["bbox"], "wall_s": t.get("wall_s"), "reused_from": t.get("reused_from")}
            for f, t in teachers.items()
        },  # fmt: skip
        "rows": summarise(runs, groups),
        "kept_runs": kept,
        "wall_s": round(time.monotonic() - started, 1),
    }
    text = markdown(summary)
    print(text)
    md_path = save(args.out, summary, text)
    chart(summary, md_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

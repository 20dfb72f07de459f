"""The paper's table 2 at our scale: which distillation terms help a small GFL student.

    python bench/ablation.py                      # synthetic set, rows a-f, 3 seeds (~30 min, 2-core CPU)
    python bench/ablation.py --dataset raccoon    # shared/data/raccoon-voc, rows a and e
    python bench/ablation.py --dataset bccd       # shared/data/bccd-voc: trainval -> test, rows a-f, 3 seeds
                                                  # (teacher ~65 min, students ~35 min on the shared 2-core CPU;
                                                  # --teacher RUN/model.pt reuses a teacher)
    python bench/ablation.py --quick              # a 2-minute smoke run of the whole pipeline

One teacher (a wider and deeper model, ``--teacher-arch``) is trained once; then the student
(``gfl_tiny``) is trained with each configuration below and each seed, every run through
``distill.train.run`` (the same code path as ``python -m distill train`` and the service's jobs):

    a  student alone                  d  Main LD + VLR LD
    b  Main KD                        e  Main KD + Main LD + VLR LD (the defaults of DistillSpec)
    c  Main LD                        f  TBR (teacher-bounded pseudo box regression, paper eq. 6)
    g  CrossKD (method "crosskd")     h  BCKD (method "bckd")
    i  CrossKD + Main KD + Main LD + VLR LD (the best combination found, bench/results/tuning/README.md)

Rows b-f take ``DistillSpec()``'s default weights and switch the other terms off, so row e checks the
defaults a job gets; rows g and h take their method's default weights (``distill.spec.METHOD_WEIGHTS``).
The seed changes the student's initialisation and the data order, not the data or the teacher. Runs go to
``--jobs`` worker processes, each with ``--threads`` torch threads: on a small shared CPU, one thread per
process avoids OpenMP's spin-waiting under load, which was measured to make a step up to 10x slower.

Writes ``bench/results/ablation[_raccoon|_bccd].md|json|png``: AP, AP50, AP75 mean and standard deviation over
the seeds, the difference to row a paired by seed, and a verdict on whether each distilled row beats (a) by
>= 2 AP beyond twice the spread, and the best one by >= 3 AP (DESIGN section 7). ``--merge OLD.json`` takes
the rows this run did not train from an earlier run of the same settings (and says so in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from report import save

from distill.spec import METHOD_WEIGHTS

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
RACCOON = Path(os.environ.get("LDD_RACCOON", SHARED / "raccoon-voc"))
BCCD = Path(os.environ.get("LDD_BCCD", SHARED / "bccd-voc"))
ROWS: dict[str, tuple[str, dict[str, Any] | None]] = {
    # row: (name, changes to the default DistillSpec; None = trained alone)
    "a": ("student alone", None),
    "b": ("Main KD", {"weights": {"main_ld": 0, "vlr_ld": 0, "vlr_kd": 0}}),
    "c": ("Main LD", {"weights": {"vlr_ld": 0, "main_kd": 0, "vlr_kd": 0}}),
    "d": ("Main LD + VLR LD", {"weights": {"main_kd": 0, "vlr_kd": 0}}),
    "e": ("Main KD + Main LD + VLR LD", {}),
    "f": ("TBR", {"method": "tbr", "weights": {"main_kd": 0, "vlr_kd": 0}}),
    "g": ("CrossKD", {"method": "crosskd"}),
    "h": ("BCKD", {"method": "bckd"}),
    "i": ("CrossKD + Main KD + Main LD + VLR LD", {"method": "crosskd", "weights": METHOD_WEIGHTS["ld"]}),
}
METRICS = ("AP", "AP50", "AP75")
# The table's term columns, in this order, for the terms some row switches on.
TERMS = {"main_kd": "Main KD", "main_ld": "Main LD", "vlr_ld": "VLR LD", "vlr_kd": "VLR KD", "tbr": "TBR",
         "fitnets": "FitNets", "crosskd_cls": "CrossKD cls", "crosskd_reg": "CrossKD reg", "bckd_cls": "BCKD cls",
         "bckd_loc": "BCKD loc"}


@dataclass
class Plan:
    dataset: str = "synthetic"  # or "raccoon", "bccd"
    rows: str = "abcdef"
    seeds: int = 3
    student_arch: str = "gfl_tiny"
    # ResNet-18 layout at half width, 64-channel FPN/head, 4 stacked convs: 4x the student's parameters.
    # gfl_r18's forward pass alone costs 5x a tiny student step on this CPU: no time would be left for students.
    teacher_arch: str = "gfl_small"
    # The synthetic set's regime: single-class digit detection with objects of 20-64 px. Measured on this
    # 2-core CPU (bench/results/tuning/): the 4x bigger teacher reaches AP 0.64 (AP75 0.77) in 24 epochs
    # and the student alone AP 0.56 (AP75 0.64) in 12, with a spread over seeds of about 1 AP: a gap for
    # distillation to close, smaller than the gap. Shorter student schedules (3 epochs) left a spread of
    # 4-7 AP that swamped every effect; 288 validation images keep the evaluation's own noise down.
    image_size: tuple[int, int] = (160, 128)
    num_train: int = 480
    num_val: int = 288
    num_classes: int = 1  # synthetic: digits 0..num_classes-1
    object_size: tuple[int, int] = (20, 64)  # synthetic: digit height range in pixels
    max_objects: int = 4
    batch: int = 4
    epochs: int = 12
    lr: float = 0.02
    warmup_iters: int = 50
    teacher_epochs: int = 24
    teacher_lr: float = 0.02
    distill: dict[str, Any] = field(default_factory=dict)  # job-level changes to DistillSpec (tuning)
    jobs: int = 1
    threads: int = 1
    device: str = "cpu"


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def job_spec(plan: Plan, data_dir: Path, row: str | None, seed: int, teacher: Path | None) -> dict[str, Any]:
    """The JSON body of one job: the student for a row, or the teacher (``row=None``)."""
    is_teacher = row is None
    schedule = {"epochs": plan.teacher_epochs if is_teacher else plan.epochs, "batch_size": plan.batch,
                "lr": plan.teacher_lr if is_teacher else plan.lr, "image_size": list(plan.image_size),
                "warmup_iters": plan.warmup_iters, "num_workers": 0}
    spec: dict[str, Any] = {"kind": "train", "name": "teacher" if is_teacher else f"{row}-seed{seed}",
                            "dataset": str(data_dir), "schedule": schedule, "seed": seed,
                            "student": {"arch": plan.teacher_arch if is_teacher else plan.student_arch}}
    changes = None if is_teacher else ROWS[row][1]
    if changes is not None:
        spec.update(kind="distill", teacher={"path": str(teacher)}, distill=_merge(plan.distill, changes))
    return spec


def run_job(spec: dict[str, Any], out_dir: str, device: str) -> dict[str, Any]:
    """One run through the training loop, in a worker process."""
    from distill.spec import LocalJobSpec
    from distill.train import run

    started = time.monotonic()
    metrics = run(LocalJobSpec.model_validate(spec), out_dir, device=device)
    metrics["wall_s"] = round(time.monotonic() - started, 1)
    metrics["spec"] = spec
    return metrics


def prepare_data(plan: Plan, work: Path) -> Path:
    if plan.dataset in ("raccoon", "bccd"):
        from distill.data.voc import import_voc

        out = work / plan.dataset
        if not (out / "annotations.json").exists():
            if plan.dataset == "raccoon":
                import_voc(RACCOON, out, splits={"train": RACCOON / "data/train_labels.csv",
                                                 "val": RACCOON / "data/test_labels.csv"})
            else:  # train on trainval, evaluate on test (split() validates on test when there is no val)
                import_voc(BCCD, out, image_sets={"trainval": "train", "test": "test"})
        return out
    from distill.data.synthetic import make_synthetic

    name = f"synthetic-{plan.image_size[0]}x{plan.image_size[1]}-{plan.num_train}-{plan.num_val}-c{plan.num_classes}" \
        f"-s{plan.object_size[0]}-{plan.object_size[1]}-o{plan.max_objects}"
    return make_synthetic(work / name, num_train=plan.num_train, num_val=plan.num_val,
                          image_size=tuple(plan.image_size), num_classes=plan.num_classes,
                          min_size=plan.object_size[0], max_size=plan.object_size[1],
                          max_objects=plan.max_objects, seed=0)


def summarise(plan: Plan, runs: dict[str, list[dict]], teacher: dict, wall_s: float,
              merged: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rows' statistics over seeds, their comparison with (a) and the verdict's facts. ``merged``: an
    earlier summary of the same settings whose rows this run did not train are taken as they are."""
    from distill.spec import DistillSpec

    rows: dict[str, Any] = {}
    for row, results in runs.items():
        by_seed = sorted(results, key=lambda r: r["spec"]["seed"])
        stats = {}
        for m in METRICS:
            values = [r["bbox"][m] for r in by_seed]
            stats[m] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": values}
        distill_spec = by_seed[0]["spec"].get("distill")
        terms = {}
        if distill_spec is not None:
            weights = DistillSpec.model_validate(distill_spec).weights.model_dump()
            terms = {k: v for k, v in weights.items() if v}
        diag = [r["diagnostics"]["after"] for r in by_seed if r.get("diagnostics")]
        cls_diag = [x["cls_l1_mean"] for x in diag if x.get("cls_l1_mean") is not None]
        rows[row] = {"name": ROWS[row][0], "terms": terms, **stats,
                     "box_l1_after": statistics.mean(x["box_l1_mean"] for x in diag) if diag else None,
                     "cls_l1_after": statistics.mean(cls_diag) if cls_diag else None,
                     "wall_s": [r["wall_s"] for r in by_seed]}
    if merged is not None:
        for row, r in merged["rows"].items():
            if row not in rows:
                rows[row] = {**r, "from": merged.get("source", "an earlier run")}
        rows = dict(sorted(rows.items()))
    compare(rows)
    return {"plan": asdict(plan), "defaults": DistillSpec().model_dump(), "teacher": teacher, "rows": rows,
            "wall_s": round(wall_s, 1)}


def compare(rows: dict[str, Any]) -> None:
    """Adds to every row but (a): ``paired_diff`` (the per-seed AP differences to (a): mean and std) and
    ``beats_a`` (the gain, the spread = the larger std of the two rows, and whether the gain clears it: by more
    than the spread; by >= 2 AP and twice the spread; by >= 3 AP and twice the spread, DESIGN section 7)."""
    if "a" not in rows:
        return
    base = rows["a"]
    for row, r in rows.items():
        if row == "a":
            continue
        diffs = {m: [x - y for x, y in zip(r[m]["values"], base[m]["values"], strict=True)] for m in METRICS}
        r["paired_diff"] = {m: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                            for m, v in diffs.items()}
        spread = max(base["AP"]["std"], r["AP"]["std"])
        gain = r["paired_diff"]["AP"]["mean"]
        r["beats_a"] = {"AP_gain": gain, "spread": spread, "by_more_than_spread": gain > spread,
                        "by_2AP_and_twice_spread": gain >= 0.02 and gain > 2 * spread,
                        "by_3AP_and_twice_spread": gain >= 0.03 and gain > 2 * spread}


def markdown(summary: dict[str, Any]) -> str:
    plan, rows, teacher = summary["plan"], summary["rows"], summary["teacher"]
    d = summary["defaults"]
    names = {"raccoon": "raccoon-voc (train split; evaluated on the test split)",
             "bccd": "BCCD blood cells (trained on the 292 trainval photos, evaluated on the 72 test photos)",
             "synthetic": f"synthetic digits ({plan['num_train']} train / {plan['num_val']} val images, "
                          f"{plan['num_classes']} class(es), digits {plan['object_size'][0]}-{plan['object_size'][1]} "
                          f"px, 1-{plan['max_objects']} per image)"}
    name = names[plan["dataset"]]
    used = [k for k in TERMS if any(r["terms"].get(k, 0) > 0 for r in rows.values())]
    lines = [
        f"# LD ablation on {name}",
        "",
        f"Student `{plan['student_arch']}`, teacher `{plan['teacher_arch']}` (AP {teacher['bbox']['AP']:.3f}, "
        f"AP50 {teacher['bbox']['AP50']:.3f}, AP75 {teacher['bbox']['AP75']:.3f}; "
        + (f"reused from {teacher['reused_from']}" if teacher.get("reused_from") else
           f"trained once in this run, {plan['teacher_epochs']} epochs at lr {plan['teacher_lr']}, "
           f"{teacher.get('wall_s', '?')} s")
        + f"). Images {plan['image_size'][0]}x{plan['image_size'][1]}, batch "
        f"{plan['batch']}, student {plan['epochs']} epochs at lr {plan['lr']}; {plan['seeds']} seeds; "
        f"tau {d['tau']}, gamma {d['gamma']}, kd_tau {d['kd_tau']}; weights main_ld {d['weights']['main_ld']}, "
        f"vlr_ld {d['weights']['vlr_ld']}, main_kd {d['weights']['main_kd']}, tbr {d['weights']['tbr']}; "
        f"other methods' weights: {json.dumps({m: w for m, w in METHOD_WEIGHTS.items() if m != 'ld'})}"
        + (f"; job changes {json.dumps(plan['distill'])}" if plan["distill"] else "") + ".",
        f"Whole run: {summary['wall_s'] / 60:.1f} min on {plan['device']} ({plan['jobs']} process(es) x "
        f"{plan['threads']} thread(s)).",
        "",
        "| row | " + " | ".join(TERMS[k] for k in used) + " | AP | AP50 | AP75 | AP - AP(a), paired by seed "
        "| box L1 to teacher |",
        "|---|" + ":-:|" * len(used) + "---:|---:|---:|---:|---:|",
    ]
    for row, r in rows.items():
        t = r["terms"]
        marks = [f"{t[k]:g}" if t.get(k, 0) > 0 else "" for k in used]
        cells = [f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['std']:.1f}" for m in METRICS]
        diff = r.get("paired_diff", {}).get("AP")
        diff_cell = f"{100 * diff['mean']:+.1f} ± {100 * diff['std']:.1f}" if diff else ""
        box = f"{r['box_l1_after']:.3f}" if r["box_l1_after"] is not None else ""
        name = r["name"] + (" *" if r.get("from") else "")
        lines.append(f"| ({row}) {name} | " + " | ".join(marks) + (" | " if marks else "") + " | ".join(cells)
                     + f" | {diff_cell} | {box} |")
    lines += ["", "Term columns: the weight of each term a row switches on. AP in percent, mean ± standard "
              "deviation over seeds. Box L1: mean L1 distance between the student's and the teacher's edge "
              "distributions on the validation images after training (paper fig. 4; in [0, 2])."]
    merged = sorted({r["from"] for r in rows.values() if r.get("from")})
    if merged:
        lines.append(f"Rows marked * were not trained in this run: they come from {', '.join(merged)} (same "
                     "settings and seeds).")
    lines.append("")
    lines.append("## Verdict")
    lines.append("")
    if "a" in rows:
        lead = teacher["bbox"]["AP"] - rows["a"]["AP"]["mean"]
        lines.append(f"- Teacher vs (a): the teacher leads the student alone by {100 * lead:+.1f} AP (wanted: >= 5).")
    for row, r in rows.items():
        if "beats_a" in r and row in "deghi":
            b = r["beats_a"]
            ok = "yes" if b["by_more_than_spread"] else "NO"
            ok2 = "yes" if b.get("by_2AP_and_twice_spread") else "NO"
            lines.append(f"- ({row}) {r['name']} vs (a): AP gain {100 * b['AP_gain']:+.1f} points (paired by seed), "
                         f"spread (larger std of the two rows) {100 * b['spread']:.1f}: above (a) by more than the "
                         f"spread: **{ok}**; by >= 2 AP and more than twice the spread (DESIGN section 7): **{ok2}**.")
    distilled = {row: r for row, r in rows.items() if "beats_a" in r}
    if distilled:
        best = max(distilled, key=lambda row: distilled[row]["beats_a"]["AP_gain"])
        b = distilled[best]["beats_a"]
        ok3 = "yes" if b.get("by_3AP_and_twice_spread") else "NO"
        lines.append(f"- Best row: ({best}) {distilled[best]['name']}, {100 * b['AP_gain']:+.1f} AP over (a) "
                     f"(spread {100 * b['spread']:.1f}): >= 3 AP and more than twice the spread (DESIGN section 7, "
                     f"the best method): **{ok3}**.")
    order = [r for r in ("a", "c", "d", "e") if r in rows]
    if len(order) > 1:
        means = [rows[r]["AP"]["mean"] for r in order]
        in_order = all(x <= y for x, y in zip(means, means[1:], strict=False))
        lines.append(f"- Paper's order {' < '.join(f'({r})' for r in order)}: "
                     f"{'holds' if in_order else 'does not hold'} on the means "
                     f"({', '.join(f'{100 * m:.1f}' for m in means)}).")
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = [f"({k}) {v['name']}" for k, v in rows.items()]
    fig, ax = plt.subplots(figsize=(max(9, 1.2 * len(rows)), 4.5))
    width = 0.27
    for i, m in enumerate(METRICS):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        ax.bar(xs, [100 * r[m]["mean"] for r in rows.values()], width,
               yerr=[100 * r[m]["std"] for r in rows.values()], capsize=3, label=m)
    ax.axhline(100 * summary["teacher"]["bbox"]["AP"], color="k", ls="--", lw=1, label="teacher AP")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("percent")
    ax.set_title(f"Distillation ablation ({summary['plan']['dataset']}, {summary['plan']['seeds']} seeds, mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("synthetic", "raccoon", "bccd"), default="synthetic")
    parser.add_argument("--rows", default=None, help="which rows (default: abcdef; raccoon: ae)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"))
    parser.add_argument("--train", type=int, default=None, help="synthetic training images")
    parser.add_argument("--val", type=int, default=None, help="synthetic validation images")
    parser.add_argument("--classes", type=int, default=None, help="synthetic classes (digits 0..N-1)")
    parser.add_argument("--object-size", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--max-objects", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--teacher-arch", default=None)
    parser.add_argument("--teacher-lr", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--distill", default=None, help="JSON changes to DistillSpec for every distilled row")
    parser.add_argument("--teacher", type=Path, default=None, help="reuse this teacher checkpoint")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="results name (default: ablation[_raccoon|_bccd])")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of the whole pipeline")
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier summary (.json) of the same settings: its rows this run does not train "
                        "are kept")
    args = parser.parse_args(argv)

    plan = Plan(dataset=args.dataset, jobs=args.jobs, threads=args.threads, device=args.device)
    if args.dataset == "raccoon":
        # 160 training photos, large objects, no pretrained backbone: longer schedules at a small size.
        plan.rows, plan.image_size, plan.epochs, plan.teacher_epochs = "ae", (192, 144), 48, 96
    if args.dataset == "bccd":
        # 292 photos, 13 cells each, no pretrained backbone. Measured on this CPU (bench/results/ablation_bccd.md):
        # at 256x192 gfl_small reaches AP 40.6 in 36 epochs, gfl_tiny 38.9 in 12, 37.3 in 8 and 33.2 in 4
        # epochs. The larger model alone adds little here (platelets, 16 px at this size, stay at AP ~0 for
        # both), so the teacher's lead of >= 5 AP comes from its 9x longer schedule: the student is trained
        # 4 epochs, where it is not converged. Larger inputs would find platelets but cost 2-4x per run.
        plan.image_size, plan.epochs, plan.teacher_epochs, plan.lr, plan.teacher_lr = (256, 192), 4, 36, 0.01, 0.01
        plan.warmup_iters = 100
    if args.quick:
        plan.seeds, plan.num_train, plan.num_val, plan.epochs, plan.teacher_epochs = 2, 32, 16, 1, 1
    for name, value in (("rows", args.rows), ("seeds", args.seeds), ("num_train", args.train),
                        ("num_val", args.val), ("epochs", args.epochs), ("teacher_epochs", args.teacher_epochs),
                        ("lr", args.lr), ("num_classes", args.classes), ("max_objects", args.max_objects),
                        ("batch", args.batch), ("warmup_iters", args.warmup), ("teacher_arch", args.teacher_arch),
                        ("teacher_lr", args.teacher_lr)):
        if value is not None:
            setattr(plan, name, value)
    if args.size:
        plan.image_size = tuple(args.size)
    if args.object_size:
        plan.object_size = tuple(args.object_size)
    if args.distill:
        plan.distill = json.loads(args.distill)
    out_name = args.out or ("ablation" if args.dataset == "synthetic" else f"ablation_{args.dataset}")

    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="ld-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(plan, work)
    runs_dir = work / out_name
    print(f"data: {data_dir}; runs: {runs_dir}", flush=True)

    ctx = get_context("spawn")  # fresh interpreters: no torch thread pools or OpenMP state copied by fork
    with ProcessPoolExecutor(plan.jobs, mp_context=ctx, initializer=_worker_init, initargs=(plan.threads,)) as pool:
        def submit(spec: dict[str, Any], name: str) -> Any:
            # A run folder left by an earlier invocation would be resumed (or refused, if its settings
            # differ): every run here starts afresh. Only the folders this run writes are removed, so a
            # reused --teacher inside this folder survives.
            shutil.rmtree(runs_dir / name, ignore_errors=True)
            return pool.submit(run_job, spec, str(runs_dir / name), plan.device)

        teacher_future = None
        if not args.teacher:  # first in the queue: everything else but the rows trained alone waits for it
            teacher_future = submit(job_spec(plan, data_dir, None, 0, None), "teacher")
        futures = {(row, seed): submit(job_spec(plan, data_dir, row, seed, None), f"{row}-seed{seed}")
                   for seed in range(plan.seeds) for row in plan.rows if ROWS[row][1] is None}
        if teacher_future is None:
            teacher_path = args.teacher
            teacher = json.loads((teacher_path.parent / "metrics.json").read_text())
            teacher["reused_from"] = str(teacher_path)
        else:
            teacher = teacher_future.result()
            teacher_path = runs_dir / "teacher" / "model.pt"
        print(f"teacher: {teacher['bbox']} ({teacher.get('wall_s', '?')} s)", flush=True)
        futures.update({(row, seed): submit(job_spec(plan, data_dir, row, seed, teacher_path), f"{row}-seed{seed}")
                        for seed in range(plan.seeds) for row in plan.rows if ROWS[row][1] is not None})
        runs: dict[str, list[dict]] = {row: [] for row in plan.rows}
        for (row, seed), fut in futures.items():
            result = fut.result()
            runs[row].append(result)
            print(f"({row}) seed {seed}: AP {result['bbox']['AP']:.4f} AP50 {result['bbox']['AP50']:.4f} "
                  f"AP75 {result['bbox']['AP75']:.4f} ({result['wall_s']} s)", flush=True)

    merged = None
    if args.merge:
        merged = json.loads(args.merge.read_text())
        merged["source"] = f"{args.merge.name} (whole run {merged['wall_s'] / 60:.1f} min)"
    summary = summarise(plan, runs, teacher, time.monotonic() - started, merged)
    text = markdown(summary)
    print(text)
    md_path = save(out_name, summary, text)
    chart(summary, md_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a teacher's edge distributions add over its boxes alone (issue 19, the paper's thesis).

    python bench/standard_teacher.py                         # BCCD trainval -> test, 3 seeds
    python bench/standard_teacher.py --teacher-epochs 8      # a shorter teacher schedule (stated in the output)
    python bench/standard_teacher.py --teacher RUN/model.pt  # reuse a gfl_small teacher
    python bench/standard_teacher.py --quick                 # a smoke run of the whole pipeline

One distribution teacher (``gfl_small``, trained once, as in ``bench/results/ablation_bccd.md``) teaches a
``gfl_tiny`` student two ways, each with the defaults of DistillSpec (Main KD + Main LD + VLR LD):

    a  student alone
    e  full LD: the teacher's own edge distributions
    s  two-bin: only the teacher's decoded edges, each spread over its two neighbouring bins, as a standard
       teacher (mmdetection's RetinaNet, FCOS, ATSS) gives them (``distill.models.spread_teacher``)

Row (s) wraps the same teacher (:class:`TwoBinHead`) so that its box logits are ``log`` of the two-bin spread of
its integral, with ``hard_edge_targets`` (LD at temperature 1, as for a standard teacher); its classes (KD) and
boxes (its decode: the spread's expectation is the edge) are unchanged. So (e) - (s) is what the distributions
add. Everything else is the ablation's machinery (``ablation_plan``: plan, job specs, data; ``ablation_report``:
the comparison engine's judgement, markdown and chart). Writes ``bench/results/standard_teacher_bccd.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ablation_plan import ROWS, Plan, job_spec, prepare_data, run_job, teacher_result, worker_init
from ablation_report import chart, markdown, per_seed, summarise
from report import save

from core import comparison

TWO_BIN = "s"
ROWS[TWO_BIN] = ("Main KD + Main LD + VLR LD, two-bin teacher", {})  # the job of row (e); the teacher differs


def two_bin_teacher(model: Any, reg_max: int) -> Any:
    """``model`` (a distribution teacher, ``Detector``) with its box logits replaced by the two-bin spread of its
    decoded edges (:class:`TwoBinHead`), read as a standard teacher's (``hard_edge_targets``)."""
    import torch

    from distill.models.spread_teacher import EMPTY_BIN, two_bin_spread

    class TwoBinHead(torch.nn.Module):
        """The teacher's head, then per level ``reg (N, A*4*(R+1), H, W)`` -> log two-bin spread of its integral
        (edges in stride units, the same layout). ``cls`` and quality pass through."""

        def __init__(self, head: torch.nn.Module):
            super().__init__()
            self.head = head
            self.num_anchors, self.has_quality, self.integral = head.num_anchors, head.has_quality, head.integral
            self.reg_max = head.reg_max

        def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
            out = self.head(feats)
            r = self.reg_max
            reg = []
            for lvl in out[1]:
                n, c, h, w = lvl.shape
                edges = self.integral(lvl.reshape(n, c // (r + 1), r + 1, h, w).movedim(2, -1))  # (N, A*4, H, W)
                spread = two_bin_spread(edges, r).clamp_min(EMPTY_BIN).log()  # (N, A*4, H, W, R+1)
                reg.append(spread.movedim(-1, 2).reshape(n, c, h, w).to(lvl.dtype))
            return (out[0], reg, *out[2:])

    assert model.reg_max == reg_max, "the two-bin view keeps the teacher's bins: the student's must be the same"
    model.bbox_head = TwoBinHead(model.bbox_head)
    model.hard_edge_targets = True
    return model


def run_two_bin(spec: dict[str, Any], out_dir: str, device: str) -> dict[str, Any]:
    """Row (s): one distillation run whose teacher is read through :func:`two_bin_teacher` (in a worker process;
    the hook the training loop wraps its teacher with is put back afterwards, for the process's next run)."""
    import distill.train

    hook = distill.train.spread_teacher
    distill.train.spread_teacher = two_bin_teacher
    try:
        return run_job(spec, out_dir, device)
    finally:
        distill.train.spread_teacher = hook


def distributions_gain(summary: dict[str, Any]) -> str:
    """Row (e) against row (s), paired by seed by the comparison engine: what the distributions add (stored in
    ``summary["distributions_gain"]``); the markdown section that says it."""
    rows = summary["rows"]
    if not {"e", TWO_BIN} <= rows.keys():
        return ""
    both = {TWO_BIN: rows[TWO_BIN], "e": rows["e"]}
    gain = comparison.compare(per_seed(both), rows[TWO_BIN]["name"])[1]
    summary["distributions_gain"] = {k: gain[k] for k in ("gain", "significant")}
    g = gain["gain"]
    return (
        f"\n## What the distributions add: (e) full LD vs (s) two-bin\n\n"
        f"- (e) minus (s), paired by seed: {comparison.gain_cell(gain)} AP, 95% interval "
        f"{comparison.interval_cell(gain)} over {g['n']} seeds: "
        f"{'significant' if gain['significant'] else 'inside noise (the interval includes 0)'}.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the ablation's 36")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"), help="default: 256 192")
    parser.add_argument("--teacher", type=Path, default=None, help="reuse this gfl_small teacher checkpoint")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", default="standard_teacher_bccd")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take the runs already finished in --work (same settings: more seeds, or a run cut short) as they are",
    )
    args = parser.parse_args(argv)

    # The settings of bench/results/ablation_bccd.md (bench/ablation.py --dataset bccd), rows a, e and s.
    plan = Plan(dataset="bccd", rows=f"ae{TWO_BIN}", seeds=args.seeds, jobs=args.jobs)
    plan.image_size, plan.epochs, plan.teacher_epochs, plan.lr, plan.teacher_lr = (256, 192), 4, 36, 0.01, 0.01
    plan.warmup_iters = 100
    if args.teacher_epochs:
        plan.teacher_epochs = args.teacher_epochs
    if args.size:
        plan.image_size = tuple(args.size)
    if args.quick:
        plan.image_size, plan.epochs, plan.teacher_epochs, plan.seeds = (96, 64), 1, 1, 2

    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="ld-standard-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(plan, work)
    runs_dir = work / args.out
    print(f"data: {data_dir}; runs: {runs_dir}; plan: {plan}", flush=True)
    ctx = get_context("spawn")
    with ProcessPoolExecutor(plan.jobs, mp_context=ctx, initializer=worker_init, initargs=(plan.threads,)) as pool:

        def submit(fn: Any, spec: dict[str, Any], name: str) -> Any:
            finished = runs_dir / name / "metrics.json"
            if args.reuse and finished.is_file():  # a run of an earlier invocation with the same settings
                done: Future = Future()
                done.set_result({**json.loads(finished.read_text()), "spec": spec, "wall_s": None, "reused": True})
                return done
            shutil.rmtree(runs_dir / name, ignore_errors=True)
            return pool.submit(fn, spec, str(runs_dir / name), plan.device)

        teacher_future = None
        if not args.teacher:
            teacher_future = submit(run_job, job_spec(plan, data_dir, None, 0, None), "teacher")
        # The student alone needs no teacher: its runs share the teacher's time.
        futures = {
            ("a", s): submit(run_job, job_spec(plan, data_dir, "a", s, None), f"a-seed{s}") for s in range(plan.seeds)
        }
        teacher, teacher_path = teacher_result(teacher_future, args.teacher, runs_dir)
        print(f"teacher: {teacher['bbox']} ({teacher.get('wall_s', '?')} s)", flush=True)
        for s in range(plan.seeds):  # the two ways of a seed side by side: a cut-short run still pairs them
            for row, fn in ((TWO_BIN, run_two_bin), ("e", run_job)):
                futures[(row, s)] = submit(fn, job_spec(plan, data_dir, row, s, teacher_path), f"{row}-seed{s}")
        runs: dict[str, list[dict]] = {row: [] for row in plan.rows}
        for (row, seed), fut in futures.items():
            result = fut.result()
            runs[row].append(result)
            print(
                f"({row}) seed {seed}: AP {result['bbox']['AP']:.4f} AP50 {result['bbox']['AP50']:.4f} "
                f"AP75 {result['bbox']['AP75']:.4f} ({result['wall_s']} s)",
                flush=True,
            )

    summary = summarise(plan, runs, teacher, time.monotonic() - started)
    text = markdown(summary).replace("# LD ablation on", "# Full edge distributions vs two-bin edges, on", 1)
    text += distributions_gain(summary)
    print(text)
    md_path = save(("tmp/" if args.quick else "") + args.out, summary, text)  # a smoke run is not a result
    chart(summary, md_path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

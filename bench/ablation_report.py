"""The ablation's figures, computed by the comparison engine (``core.comparison``, the same as a study's report):
the rows' statistics over seeds, their gain over row (a) paired by seed with its 95% interval from Student's t,
the verdicts (DESIGN section 7: a distilled row meets "+2 AP" when its gain is >= 2 AP and its interval excludes 0;
the best one "+3 AP"), the markdown and the bar chart (``bench/results/ablation*.md|json|png``).

:func:`judge` recomputes every statistic and verdict from the rows' stored per-seed values, so a stored summary is
re-judged without training (``python bench/ablation.py --regenerate``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ablation_plan import METRICS, ROWS, TERMS, Plan
from report import RESULTS, provenance, provenance_line, save

from core import comparison
from distill.spec import METHOD_WEIGHTS

BASELINE = ROWS["a"][0]  # "student alone", the name the studies give the plain student too
GOALS = {"verdict_2AP": 0.02, "verdict_3AP": 0.03}  # DESIGN section 7: every distilled row; the best one
NOTES = "## Notes (written by hand after the run)"  # what follows this heading in a results file is kept as it is


def summarise(
    plan: Plan, runs: dict[str, list[dict]], teacher: dict, wall_s: float, merged: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The rows' per-seed values and their judgement (:func:`judge`). ``merged``: an earlier summary of the same
    settings whose rows this run did not train are taken as they are."""
    from distill.spec import DistillSpec

    rows: dict[str, Any] = {}
    for row, results in runs.items():
        by_seed = sorted(results, key=lambda r: r["spec"]["seed"])
        distill_spec = by_seed[0]["spec"].get("distill")
        terms = {}
        if distill_spec is not None:
            weights = DistillSpec.model_validate(distill_spec).weights.model_dump()
            terms = {k: v for k, v in weights.items() if v}
        diag = [r["diagnostics"]["after"] for r in by_seed if r.get("diagnostics")]
        cls_diag = [x["cls_l1_mean"] for x in diag if x.get("cls_l1_mean") is not None]
        rows[row] = {
            "name": ROWS[row][0],
            "terms": terms,
            "seeds": [r["spec"]["seed"] for r in by_seed],
            **{m: {"values": [r["bbox"][m] for r in by_seed]} for m in METRICS},
            "box_l1_after": statistics.mean(x["box_l1_mean"] for x in diag) if diag else None,
            "cls_l1_after": statistics.mean(cls_diag) if cls_diag else None,
            "wall_s": [r["wall_s"] for r in by_seed],
        }
    if merged is not None:
        for row, r in merged["rows"].items():
            if row not in rows:
                rows[row] = {**r, "from": merged.get("source", "an earlier run")}
        rows = dict(sorted(rows.items()))
    judge(rows)
    return {
        "plan": asdict(plan),
        "defaults": DistillSpec().model_dump(),
        "method_weights": METHOD_WEIGHTS,
        "teacher": teacher,
        "rows": rows,
        "wall_s": round(wall_s, 1),
    }


def per_seed(rows: dict[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    """The engine's input: row name -> {seed: {AP, AP50, AP75}} from the rows' stored values (in seed order;
    summaries written before rows recorded their seeds ran seeds 0..n-1)."""
    out = {}
    for r in rows.values():
        seeds = r.get("seeds") or list(range(len(r["AP"]["values"])))
        out[r["name"]] = {s: {m: r[m]["values"][i] for m in METRICS} for i, s in enumerate(seeds)}
    return out


def judge(rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row's statistics, gain over (a) and verdicts, recomputed by the engine from its per-seed values and
    written into the row (the judgement of earlier rules, ``paired_diff`` and ``beats_a``, goes). Returns the
    engine's rows, in the same order."""
    compared = comparison.compare(per_seed(rows), BASELINE)
    for r, c in zip(rows.values(), compared, strict=True):
        r.pop("paired_diff", None)
        r.pop("beats_a", None)
        r.update({m: c[m] for m in METRICS}, seeds=c["seeds"], gain=c["gain"], significant=c["significant"])
        for key, goal in GOALS.items():
            r[key] = comparison.verdict(c, goal)
    return compared


def markdown(summary: dict[str, Any]) -> str:
    plan, rows, teacher = summary["plan"], summary["rows"], summary["teacher"]
    d = summary["defaults"]
    names = {
        "raccoon": "raccoon-voc (train split; evaluated on the test split)",
        "bccd": "BCCD blood cells (trained on the 292 trainval photos, evaluated on the 72 test photos)",
        "synthetic": f"synthetic digits ({plan['num_train']} train / {plan['num_val']} val images, "
        f"{plan['num_classes']} class(es), digits {plan['object_size'][0]}-{plan['object_size'][1]} "
        f"px, 1-{plan['max_objects']} per image)",
    }
    name = names[plan["dataset"]]
    used = [k for k in TERMS if any(r["terms"].get(k, 0) > 0 for r in rows.values())]
    lines = [
        f"# LD ablation on {name}",
        "",
        f"Student `{plan['student_arch']}`, teacher `{plan['teacher_arch']}` (AP {teacher['bbox']['AP']:.3f}, "
        f"AP50 {teacher['bbox']['AP50']:.3f}, AP75 {teacher['bbox']['AP75']:.3f}; "
        + (
            f"reused from {teacher['reused_from']}"
            if teacher.get("reused_from")
            else f"trained once in this run, {plan['teacher_epochs']} epochs at lr {plan['teacher_lr']}, "
            f"{teacher.get('wall_s', '?')} s"
        )
        + f"). Images {plan['image_size'][0]}x{plan['image_size'][1]}, batch "
        f"{plan['batch']}, student {plan['epochs']} epochs at lr {plan['lr']}; {plan['seeds']} seeds; "
        f"tau {d['tau']}, gamma {d['gamma']}, kd_tau {d['kd_tau']}; weights main_ld {d['weights']['main_ld']}, "
        f"vlr_ld {d['weights']['vlr_ld']}, main_kd {d['weights']['main_kd']}, tbr {d['weights']['tbr']}"
        + (
            f"; other methods' weights: {json.dumps({m: w for m, w in summary['method_weights'].items() if m != 'ld'})}"
            if summary.get("method_weights")  # recorded by the run (older summaries predate the other methods)
            else ""
        )
        + (f"; job changes {json.dumps(plan['distill'])}" if plan["distill"] else "")
        + ".",
        f"Whole run: {summary['wall_s'] / 60:.1f} min on {plan['device']} ({plan['jobs']} process(es) x "
        f"{plan['threads']} thread(s)).",
        "",
    ]
    if summary.get("provenance"):
        lines.append(provenance_line(summary["provenance"]))
    lines += [
        "",
        "| row | " + " | ".join(TERMS[k] for k in used) + " | box L1 to teacher |",
        "|---|" + ":-:|" * len(used) + "---:|",
    ]
    for row, r in rows.items():
        t = r["terms"]
        marks = [f"{t[k]:g}" if t.get(k, 0) > 0 else "" for k in used]
        box = f"{r['box_l1_after']:.3f}" if r["box_l1_after"] is not None else ""
        lines.append(
            f"| ({row}) {r['name']}{' *' if r.get('from') else ''} | " + "".join(m + " | " for m in marks) + f"{box} |"
        )
    lines += [
        "",
        "Term columns: the weight of each term a row switches on. Box L1: mean L1 distance between the student's and "
        "the teacher's edge distributions on the validation images after training (paper fig. 4; in [0, 2]).",
    ]
    merged = sorted({r["from"] for r in rows.values() if r.get("from")})
    if merged:
        lines.append(
            f"Rows marked * were not trained in this run: they come from {', '.join(merged)} (same settings and seeds)."
        )
    lines += [
        "",
        f"Compared with (a) {BASELINE} by the comparison engine (``core.comparison``, as in a study's report):",
        "",
    ]
    lines += comparison.table(engine_rows(summary))
    lines += ["", comparison.CAPTION, "", "## Verdict", ""]
    if "a" in rows:
        lead = teacher["bbox"]["AP"] - rows["a"]["AP"]["mean"]
        lines.append(f"- Teacher vs (a): the teacher leads the student alone by {100 * lead:+.1f} AP (wanted: >= 5).")
    for row, r in rows.items():
        if r.get("gain"):
            lines.append(
                f"- ({row}) {r['name']} vs (a): gain {comparison.gain_cell(r)} AP, 95% interval "
                f"{comparison.interval_cell(r)}, paired over {r['gain']['n']} seeds: significant: "
                f"**{ {None: '-', True: 'yes', False: 'no'}[r['significant']] }**; "
                f"+2 AP (DESIGN section 7): **{r['verdict_2AP']}**."
            )
    distilled = {row: r for row, r in rows.items() if r.get("gain")}
    if distilled:
        best = max(distilled, key=lambda row: distilled[row]["gain"]["mean"])
        r = distilled[best]
        lines.append(
            f"- Best row: ({best}) {r['name']}, {comparison.gain_cell(r)} AP over (a), interval "
            f"{comparison.interval_cell(r)}: +3 AP (DESIGN section 7, the best method): **{r['verdict_3AP']}**."
        )
    order = [r for r in ("a", "c", "d", "e") if r in rows]
    if len(order) > 1:
        means = [rows[r]["AP"]["mean"] for r in order]
        in_order = all(x <= y for x, y in zip(means, means[1:], strict=False))
        lines.append(
            f"- Paper's order {' < '.join(f'({r})' for r in order)}: "
            f"{'holds' if in_order else 'does not hold'} on the means "
            f"({', '.join(f'{100 * m:.1f}' for m in means)})."
        )
    return "\n".join(lines) + "\n"


def engine_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary's rows as the comparison engine's rows (named as a study names them)."""
    return [{**r, "row": r["name"]} for r in summary["rows"].values()]


def chart(summary: dict[str, Any], path: Path) -> None:
    """The engine's bars, one figure (``ablation*.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [{**r, "row": f"({k}) {r['name']}"} for k, r in summary["rows"].items()]
    fig = Figure(figsize=(max(9, 1.2 * len(rows)), 4.5), dpi=110)
    ax = fig.subplots()
    plan = summary["plan"]
    comparison.draw(
        ax, rows, f"Distillation ablation ({plan['dataset']}, {plan['seeds']} seeds)", summary["teacher"]["bbox"]["AP"]
    )
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})


def regenerate(name: str) -> Path:
    """Re-judge ``bench/results/<name>.json`` from its stored per-seed values (no training) and rewrite its
    ``.json``, ``.md`` and ``.png``. The provenance of the measurement is kept, with a note of this re-judgement;
    the markdown's hand-written notes (from :data:`NOTES` on) are kept as they are. The ``.md`` path."""
    summary = json.loads((RESULTS / f"{name}.json").read_text())
    if "provenance" not in summary:
        raise SystemExit(f"{name}.json has no provenance: add the commit, date, machine and load it was measured at")
    now = provenance()
    summary["provenance"]["note"] = (
        f"Verdicts re-judged from the stored per-seed values (core.stats, paired 95% t interval) at commit "
        f"{now['commit']} on {now['date']}."
    )
    judge(summary["rows"])
    old = (RESULTS / f"{name}.md").read_text()
    text = markdown(summary) + ("\n" + old[old.index(NOTES) :] if NOTES in old else "")
    md_path = save(name, summary, text)
    chart(summary, md_path.with_suffix(".png"))
    return md_path

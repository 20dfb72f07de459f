"""The ablation's figures: the rows' statistics over seeds, their comparison with row (a), the markdown
table with its verdict and the bar chart (``bench/results/ablation*.md|json|png``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ablation_plan import METRICS, ROWS, TERMS, Plan

from distill.spec import METHOD_WEIGHTS


def summarise(
    plan: Plan, runs: dict[str, list[dict]], teacher: dict, wall_s: float, merged: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The rows' statistics over seeds, their comparison with (a) and the verdict's facts. ``merged``: an
    earlier summary of the same settings whose rows this run did not train are taken as they are."""
    from distill.spec import DistillSpec

    rows: dict[str, Any] = {}
    for row, results in runs.items():
        by_seed = sorted(results, key=lambda r: r["spec"]["seed"])
        stats = {}
        for m in METRICS:
            values = [r["bbox"][m] for r in by_seed]
            stats[m] = {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
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
            **stats,
            "box_l1_after": statistics.mean(x["box_l1_mean"] for x in diag) if diag else None,
            "cls_l1_after": statistics.mean(cls_diag) if cls_diag else None,
            "wall_s": [r["wall_s"] for r in by_seed],
        }
    if merged is not None:
        for row, r in merged["rows"].items():
            if row not in rows:
                rows[row] = {**r, "from": merged.get("source", "an earlier run")}
        rows = dict(sorted(rows.items()))
    compare(rows)
    return {
        "plan": asdict(plan),
        "defaults": DistillSpec().model_dump(),
        "teacher": teacher,
        "rows": rows,
        "wall_s": round(wall_s, 1),
    }


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
        r["paired_diff"] = {
            m: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0} for m, v in diffs.items()
        }
        spread = max(base["AP"]["std"], r["AP"]["std"])
        gain = r["paired_diff"]["AP"]["mean"]
        r["beats_a"] = {
            "AP_gain": gain,
            "spread": spread,
            "by_more_than_spread": gain > spread,
            "by_2AP_and_twice_spread": gain >= 0.02 and gain > 2 * spread,
            "by_3AP_and_twice_spread": gain >= 0.03 and gain > 2 * spread,
        }


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
        f"vlr_ld {d['weights']['vlr_ld']}, main_kd {d['weights']['main_kd']}, tbr {d['weights']['tbr']}; "
        f"other methods' weights: {json.dumps({m: w for m, w in METHOD_WEIGHTS.items() if m != 'ld'})}"
        + (f"; job changes {json.dumps(plan['distill'])}" if plan["distill"] else "")
        + ".",
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
        lines.append(
            f"| ({row}) {name} | "
            + " | ".join(marks)
            + (" | " if marks else "")
            + " | ".join(cells)
            + f" | {diff_cell} | {box} |"
        )
    lines += [
        "",
        "Term columns: the weight of each term a row switches on. AP in percent, mean ± standard "
        "deviation over seeds. Box L1: mean L1 distance between the student's and the teacher's edge "
        "distributions on the validation images after training (paper fig. 4; in [0, 2]).",
    ]
    merged = sorted({r["from"] for r in rows.values() if r.get("from")})
    if merged:
        lines.append(
            f"Rows marked * were not trained in this run: they come from {', '.join(merged)} (same settings and seeds)."
        )
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
            lines.append(
                f"- ({row}) {r['name']} vs (a): AP gain {100 * b['AP_gain']:+.1f} points (paired by seed), "
                f"spread (larger std of the two rows) {100 * b['spread']:.1f}: above (a) by more than the "
                f"spread: **{ok}**; by >= 2 AP and more than twice the spread (DESIGN section 7): **{ok2}**."
            )
    distilled = {row: r for row, r in rows.items() if "beats_a" in r}
    if distilled:
        best = max(distilled, key=lambda row: distilled[row]["beats_a"]["AP_gain"])
        b = distilled[best]["beats_a"]
        ok3 = "yes" if b.get("by_3AP_and_twice_spread") else "NO"
        lines.append(
            f"- Best row: ({best}) {distilled[best]['name']}, {100 * b['AP_gain']:+.1f} AP over (a) "
            f"(spread {100 * b['spread']:.1f}): >= 3 AP and more than twice the spread (DESIGN section 7, "
            f"the best method): **{ok3}**."
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
        ax.bar(
            xs,
            [100 * r[m]["mean"] for r in rows.values()],
            width,
            yerr=[100 * r[m]["std"] for r in rows.values()],
            capsize=3,
            label=m,
        )
    ax.axhline(100 * summary["teacher"]["bbox"]["AP"], color="k", ls="--", lw=1, label="teacher AP")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("percent")
    ax.set_title(f"Distillation ablation ({summary['plan']['dataset']}, {summary['plan']['seeds']} seeds, mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

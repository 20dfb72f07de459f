"""A study's report (``core.studies``): one row per method row, computed from its ended jobs. Torch-free.

The rows, their statistics over seeds, the gain over the plain student paired by seed with its 95% interval
from Student's t, ``significant`` (the interval excludes 0) and the comparison table and bars are the comparison
engine's (``core.comparison``, the same as ``bench/ablation.py``'s). This module adds, per row:

- the paper's figure 4 diagnostics after distillation (per FPN level L1 errors between teacher and student),
  averaged over seeds;
- its best seed (highest AP) and that job's model; and the jobs that did not succeed, with their error.

The recommended model is the best seed of the row with the highest mean AP. ``write`` renders report.md (the
engine's table, then the models and figure 4) and report.png (matplotlib, Agg) and replaces each atomically
(``distill.files``).
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from core import comparison
from distill.files import atomic_write_bytes, atomic_write_text, ensure_room

PLAIN_ROW = "student alone"  # the plain student's row (no distillation): the comparison's baseline


def _bbox(m: dict[str, Any]) -> dict[str, Any] | None:
    if m["state"] != "succeeded":
        return None
    bbox = (m.get("metrics") or {}).get("bbox") or {}
    return bbox if isinstance(bbox.get("AP"), int | float) else None


def _diagnostics(ok: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Figure 4 after distillation, averaged over the seeds that have it; a level's None (no class pairs for
    classification) stays None."""
    found = [d for m in ok if isinstance(d := ((m.get("metrics") or {}).get("diagnostics") or {}).get("after"), dict)]
    if not found:
        return None

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if isinstance(v, int | float)]
        return statistics.mean(values) if values else None

    def per_level(key: str) -> list[float | None] | None:
        lists = [d[key] for d in found if isinstance(d.get(key), list)]
        return [mean(list(level)) for level in zip(*lists, strict=True)] if lists else None

    return {"cls_l1_mean": mean([d.get("cls_l1_mean") for d in found]),
            "box_l1_mean": mean([d.get("box_l1_mean") for d in found]),
            "cls_l1": per_level("cls_l1"), "box_l1": per_level("box_l1"),
            "strides": found[0].get("strides"), "seeds": len(found)}  # fmt: skip


def build(study_id: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of a study whose jobs all ended. ``members``: ``core.studies.members`` (plan order: row,
    method, seed, job_id, state, metrics, model_id, error)."""
    order: list[str] = []
    for m in members:
        if m["row"] not in order:
            order.append(m["row"])
    per_seed = {name: {m["seed"]: _bbox(m) for m in members if m["row"] == name and _bbox(m)} for name in order}
    compared = {r["row"]: r for r in comparison.compare(per_seed, PLAIN_ROW)}  # type: ignore[arg-type]
    rows, failures = [], []
    for name in order:
        mine = [m for m in members if m["row"] == name]
        ok = [m for m in mine if _bbox(m)]
        row: dict[str, Any] = {"row": name, "method": mine[0]["method"], **compared[name]}
        row["diagnostics"] = _diagnostics(ok) if name != PLAIN_ROW else None
        best = max(ok, key=lambda m: _bbox(m)["AP"], default=None)  # type: ignore[index]
        row["best"] = (
            None
            if best is None
            else {"seed": best["seed"], "job_id": best["job_id"], "model_id": best["model_id"], "AP": _bbox(best)["AP"]}
        )  # type: ignore[index]
        row["failed"] = [{"job_id": m["job_id"], "seed": m["seed"], "state": m["state"], "error": m.get("error")}
                         for m in mine if not _bbox(m)]  # fmt: skip
        failures += [{"row": name, **f} for f in row["failed"]]
        rows.append(row)
    ranked = [r for r in rows if r["best"] is not None]
    top = max(ranked, key=lambda r: r["AP"]["mean"], default=None)
    recommended = None if top is None else {"row": top["row"], **top["best"]}
    # Every job of a study validates on its data set's one split, so the teacher's AP (measured by each distillation
    # job) is on the students' split; what the job check found about the teacher's training images is the same too.
    teacher = [t["AP"] for m in members if isinstance(t := (m.get("metrics") or {}).get("teacher_bbox"), dict)
               and isinstance(t.get("AP"), int | float)]  # fmt: skip
    overlap = next((o for m in members if isinstance(o := (m.get("metrics") or {}).get("teacher_overlap"), dict)), None)
    return {
        "rows": rows,
        "recommended": recommended,
        "failures": failures,
        "teacher_AP": statistics.mean(teacher) if teacher else None,
        "teacher_overlap": overlap,
        "report_md": f"/v1/studies/{study_id}/report.md",
        "report_png": f"/v1/studies/{study_id}/report.png",
    }


# ----------------------------------------------------------------------------------------------- files


def markdown(study: dict[str, Any], report: dict[str, Any]) -> str:
    spec = study.get("spec") or {}
    title = study.get("name") or study["id"]
    lines = [
        f"# Study {title}",
        "",
        f"Student {spec.get('student', {}).get('arch')}, dataset {spec.get('dataset')}, "
        f"{spec.get('seeds')} seed(s), {spec.get('schedule', {}).get('epochs')} epoch(s); the baseline is the "
        f"{PLAIN_ROW}. {comparison.CAPTION}",
        "",
    ]
    if report.get("teacher_AP") is not None:
        lines += [f"Teacher AP on the students' validation split: {100 * report['teacher_AP']:.1f}", ""]
    if (o := report.get("teacher_overlap")) and o.get("seen"):
        lines += [f"**The teacher ({o['teacher']}) was trained on {o['seen']} of these {o['val_images']} validation "
                  "images** (run with distill.allow_teacher_overlap): its AP and the distilled rows' gains are "
                  "inflated.", ""]  # fmt: skip
    elif o and o.get("seen") is None:
        lines += [f"Whether the teacher ({o['teacher']}) saw these validation images is unknown: {o.get('why')}.", ""]
    lines += comparison.table(report["rows"])
    lines += ["", "| row | method | best model |", "| --- | --- | --- |"]
    for r in report["rows"]:
        best = f"{r['best']['model_id']} (seed {r['best']['seed']})" if r["best"] else "-"
        lines.append(f"| {r['row']} | {r['method'] or '-'} | {best} |")
    diag = [r for r in report["rows"] if r["diagnostics"]]
    if diag:
        lines += ["", "Figure 4 after distillation: mean L1 error between teacher and student on the validation set "
                      "(classification scores; box edge distributions, in [0, 2]), lower is closer to the teacher.",
                  "", "| row | cls L1 | box L1 | box L1 per level (strides " +
                  ", ".join(str(s) for s in diag[0]["diagnostics"].get("strides") or []) + ") |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        for r in diag:
            d = r["diagnostics"]
            levels = ", ".join("-" if v is None else f"{v:.3f}" for v in d.get("box_l1") or [])
            cls = "-" if d["cls_l1_mean"] is None else f"{d['cls_l1_mean']:.4f}"
            box = "-" if d["box_l1_mean"] is None else f"{d['box_l1_mean']:.4f}"
            lines.append(f"| {r['row']} | {cls} | {box} | {levels} |")
    rec = report.get("recommended")
    lines += [
        "",
        "Recommended model: "
        + (
            f"**{rec['model_id']}** ({rec['row']}, seed {rec['seed']}, AP {100 * rec['AP']:.1f})"
            if rec
            else "none (no job succeeded)"
        ),
    ]
    if report["failures"]:
        lines += ["", "## Jobs that did not succeed", ""]
        lines += [f"- {f['row']}, seed {f['seed']}: job {f['job_id']} {f['state']}: {f.get('error') or ''}"
                  for f in report["failures"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(study: dict[str, Any], report: dict[str, Any]) -> bytes:
    """PNG: the comparison engine's bars (AP, AP50, AP75 per row, the paired gain with its 95% interval) and, for
    the distilled rows, figure 4's box L1 per level."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = report["rows"]
    fig = Figure(figsize=(11, 4.2), dpi=100)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    comparison.draw(ax, rows, f"Study {study.get('name') or study['id']}")
    drawn: list[int] = []
    for r in rows:
        d = r["diagnostics"]
        if d and d.get("box_l1") and d.get("strides"):
            ax2.plot(d["strides"], d["box_l1"], marker="o", label=r["row"])
            drawn = d["strides"]
    ax2.set_title("Figure 4 after distillation: box L1 per level")
    ax2.set_xlabel("FPN stride")
    ax2.set_ylabel("L1(teacher, student) of edge distributions")
    if drawn:
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(drawn, [str(s) for s in drawn])
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no distilled row succeeded", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def write(folder: Path, study: dict[str, Any], report: dict[str, Any], min_free_bytes: int = 0) -> None:
    """report.md and report.png in ``folder``, each written whole or not at all."""
    png = chart(study, report)
    text = markdown(study, report)
    folder.mkdir(parents=True, exist_ok=True)
    ensure_room(folder, min_free_bytes, "a study report", need=len(png) + len(text))
    atomic_write_bytes(folder / "report.png", png)
    atomic_write_text(folder / "report.md", text)

"""The comparison engine: method rows against a baseline row over seeds, as a table and a chart. Torch-free.

One implementation serves the studies (``core.study_report``) and the benches (``bench/ablation_report.py``,
``bench/heads.py``), so a study and a bench given the same per-seed results print the same table. Its API:

- :func:`compare` ``(per_seed, baseline)``: ``per_seed`` maps a row's name to ``{seed: {"AP": .., "AP50": ..,
  "AP75": ..}}`` (COCO values in 0-1; a seed whose run failed is simply absent), in display order, ``baseline``
  names the row the others are compared with (the plain student). Returns one dict per row: ``row``, ``seeds``,
  ``AP``/``AP50``/``AP75`` (``mean``, ``std``, ``n``, ``values`` in seed order), ``gain`` (the AP gain over the
  baseline paired by seed: ``core.stats.Interval.as_dict()`` plus ``pairs``; None for the baseline or without a
  common seed) and ``significant`` (the 95% interval excludes 0; None with fewer than two pairs).
- :func:`verdict` ``(row, goal)``: ``met`` / ``inside noise`` / ``not met`` / ``one pair`` for a goal in AP (0-1).
- :func:`table` ``(rows)``: the markdown table (a list of lines) with the interval every verdict is judged by.
- :func:`draw` ``(ax, rows, title, teacher_ap)``: the bar chart on a matplotlib axis (mean ± std per metric, the
  gain with its interval above each AP bar, * when significant).

The statistics themselves are ``core.stats`` (DESIGN section 3, Statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.stats import Interval, Verdict, paired, summary

METRICS = ("AP", "AP50", "AP75")
CAPTION = (
    "AP in points (COCO AP x 100), mean ± standard deviation over the seeds that succeeded. Gain: the row's AP "
    "minus the baseline's with the same seed, mean ± the half-width of its 95% interval from Student's t on "
    "those differences (n - 1 degrees of freedom), sd their standard deviation. Significant: the interval "
    "excludes 0; a goal of +x AP is met when the gain is >= x and significant (DESIGN section 3)."
)


def compare(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str) -> list[dict[str, Any]]:
    """Every row's statistics over its seeds and its gain over ``baseline``, paired by seed (see the module)."""
    base_ap = {s: float(m["AP"]) for s, m in per_seed.get(baseline, {}).items()}
    rows = []
    for name, results in per_seed.items():
        seeds = sorted(results)
        row: dict[str, Any] = {"row": name, "seeds": seeds}
        for key in METRICS:
            values = [float(results[s].get(key) or 0.0) for s in seeds]
            row[key] = {**summary(values), "values": values}
        row["gain"] = row["significant"] = None
        if name != baseline:
            gain = paired({s: float(results[s]["AP"]) for s in seeds}, base_ap)
            if gain.n:
                row["gain"] = {**gain.as_dict(), "pairs": gain.n}
                row["significant"] = gain.significant
        rows.append(row)
    return rows


def _interval(row: Mapping[str, Any]) -> Interval | None:
    g = row.get("gain")
    if not g:
        return None
    return Interval(g["n"], g["mean"], g["std"], g["half_width"], g["low"], g["high"], g["confidence"])


def verdict(row: Mapping[str, Any], goal: float) -> Verdict | None:
    """The row's gain against a goal in AP (0-1): ``core.stats.Interval.verdict``; None for the baseline."""
    iv = _interval(row)
    return None if iv is None else iv.verdict(goal)


def pct(s: Mapping[str, Any] | None) -> str:
    """A mean ± std of AP-like values (0-1) in AP points."""
    if not s or s.get("mean") is None:
        return "-"
    return f"{100 * s['mean']:.1f} ± {100 * (s.get('std') or 0.0):.1f}"


def gain_cell(row: Mapping[str, Any]) -> str:
    """``+3.9 ± 1.3 (sd 0.5)``: the mean gain ± its 95% half-width, in AP points; ``+1.0 (one pair)``."""
    g = row.get("gain")
    if not g:
        return "-"
    if g["half_width"] is None:
        return f"{100 * g['mean']:+.1f} (one pair)"
    return f"{100 * g['mean']:+.1f} ± {100 * g['half_width']:.1f} (sd {100 * g['std']:.1f})"


def interval_cell(row: Mapping[str, Any]) -> str:
    g = row.get("gain")
    if not g or g["low"] is None:
        return "-"
    return f"[{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The comparison as markdown lines: the same for a study and a bench given the same rows and seeds."""
    lines = [
        "| row | AP | AP50 | AP75 | seeds | gain in AP, paired by seed | 95% interval | significant |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        sig = {None: "-", True: "yes", False: "no"}[r["significant"]]
        lines.append(
            f"| {r['row']} | {pct(r['AP'])} | {pct(r['AP50'])} | {pct(r['AP75'])} | {r['AP']['n']} "
            f"| {gain_cell(r)} | {interval_cell(r)} | {sig} |"
        )
    return lines


def draw(ax: Any, rows: list[dict[str, Any]], title: str, teacher_ap: float | None = None) -> None:
    """The comparison's bars on a matplotlib axis: AP, AP50 and AP75 per row (mean ± std over seeds) and above each
    AP bar the paired gain with its 95% half-width, * when the interval excludes 0."""
    width = 0.8 / len(METRICS)
    for k, key in enumerate(METRICS):
        means = [100 * (r[key]["mean"] or 0.0) for r in rows]
        stds = [100 * (r[key]["std"] or 0.0) for r in rows]
        ax.bar([i + (k - 1) * width for i in range(len(rows))], means, width, yerr=stds, capsize=3, label=key)
    for i, r in enumerate(rows):
        if r["gain"] is not None:
            g = r["gain"]
            text = f"{100 * g['mean']:+.1f}" + ("" if g["half_width"] is None else f"±{100 * g['half_width']:.1f}")
            top = 100 * ((r["AP"]["mean"] or 0.0) + (r["AP"]["std"] or 0.0))
            ax.annotate(text + (" *" if r["significant"] else ""), (i - width, top), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=7)  # fmt: skip
    if teacher_ap is not None:
        ax.axhline(100 * teacher_ap, color="k", ls="--", lw=1, label="teacher AP")
    ax.set_xticks(range(len(rows)), [r["row"] + ("" if r["AP"]["n"] else "\n(no result)") for r in rows],
                  rotation=15, ha="right", fontsize=8)  # fmt: skip
    ax.set_ylabel("COCO AP x 100 (mean ± std over seeds)")
    ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
    ax.set_title(title + ": gain vs the baseline ± 95% interval, * excludes 0", fontsize=9)
    ax.legend(fontsize=8)

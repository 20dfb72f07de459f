"""The paper's figure 5 for one finished distillation run: where on an image the student's box logits are far
from the teacher's, before and after distillation (``distill.logit_maps``, drawn by ``deploy.draw``).

    python bench/figure5.py RUN_DIR DATASET_DIR [--out figure5_bccd]

``RUN_DIR`` is a run folder of ``distill.train.run`` (its ``metrics.json`` holds ``diagnostics.figure5``; e.g. a
distilled row of ``bench/imitation.py --work W``: ``W/imitation_bccd/e-seed0``), ``DATASET_DIR`` its data set.
Writes ``bench/results/<out>.png`` with ``<out>.json|md`` (provenance, the run, and each level's mean and
largest error before and after, so the picture's claim can be read as numbers too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from report import RESULTS, save

from deploy.draw import draw_error_maps
from distill.data.annotations import load_coco


def level_errors(figure: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level: the mean and largest box-logit error before and after, and after / before of the means."""
    rows = []
    for j, stride in enumerate(figure["after"]["strides"]):
        before = np.asarray(figure["before"]["maps"][j], dtype=np.float64)
        after = np.asarray(figure["after"]["maps"][j], dtype=np.float64)
        rows.append({"level": f"P{int(stride).bit_length() - 1}", "stride": int(stride),
                     "before_mean": float(before.mean()), "after_mean": float(after.mean()),
                     "before_max": float(before.max()), "after_max": float(after.max()),
                     "ratio": float(after.mean() / before.mean())})  # fmt: skip
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("dataset", type=Path)
    p.add_argument("--out", default="figure5_bccd")
    args = p.parse_args(argv)
    metrics = json.loads((args.run / "metrics.json").read_text())
    figure = (metrics.get("diagnostics") or {}).get("figure5")
    if not figure:
        print(f"{args.run}: no diagnostics.figure5 in metrics.json (not a finished distillation run)")
        return 1
    image = load_coco(args.dataset, check_images=False).image(int(figure["after"]["image_id"]))
    draw_error_maps(image["path"], figure).save(RESULTS / f"{args.out}.png")
    rows = level_errors(figure)
    lines = [f"# Figure 5: box-logit error to the teacher before and after distillation ({args.run.name})", "",
             f"Run `{args.run.name}`, validation image "
             f"`{Path(image['file_name']).name}` at {figure['after']['size'][1]}x{figure['after']['size'][0]}. "
             f"Picture: `{args.out}.png` (top: before, bottom: after; each column one colour scale).", "",
             "| level | mean before | mean after | after / before | largest before | largest after |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    lines += [f"| {r['level']} | {r['before_mean']:.1f} | {r['after_mean']:.1f} | {r['ratio']:.2f} | "
              f"{r['before_max']:.1f} | {r['after_max']:.1f} |" for r in rows]  # fmt: skip
    save(args.out, {"run": str(args.run.name), "image": image["file_name"], "levels": rows}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

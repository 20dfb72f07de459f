"""The paper's table 3 at our scale: feature imitation on the FPN levels, alone and beside LD (and PKD beside
CrossKD), on BCCD with the teacher and student of the BCCD ablation, 3 seeds per row.

    python bench/imitation.py                       # rows a, e, j-x on shared/data/bccd-voc (trainval -> test)
    python bench/imitation.py --teacher RUN/model.pt  # reuse a trained BCCD teacher (it costs ~65 min)
    python bench/imitation.py --quick                 # a smoke run on the synthetic set

Rows (``bench/ablation_plan.py``): a the student alone; e LD's default (Main KD + Main LD + VLR LD); j-p each
imitation alone (FitNets, Inside GT box, Main region, Fine-Grained, DeFeat, GI, PKD); q-w LD's default plus
each; x CrossKD + PKD. Everything else (runs, statistics by the comparison engine, provenance) is
``bench/ablation.py``'s; results go to ``bench/results/imitation_bccd.{json,md,png}``.

The paper's order to reproduce: every imitation alone is below LD's default, and LD + GI is at or above LD.
"""

from __future__ import annotations

import sys

from ablation import main as ablation_main

ROWS = "aejklmnopqrstuvwx"


def main(argv: list[str]) -> int:
    if "--quick" in argv:
        return ablation_main(["--rows", "aejnqx", "--out", "imitation_quick", *argv])
    return ablation_main(["--dataset", "bccd", "--rows", ROWS, "--out", "imitation_bccd", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

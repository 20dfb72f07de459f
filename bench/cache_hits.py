"""How often the teacher cache answers on real photos, under its old key and its new one (issue 21).

    python bench/cache_hits.py [--size 512 320] [--batch 4] [--epochs 12]

The training loop's own batches (``distill.data.dataset.build_loaders``: keep-ratio resize, random flip,
batches grouped by aspect ratio) over ``--epochs`` epochs of raccoon (shared/data/raccoon-voc, its training
split) and BCCD (trainval). For each batch the cache's keys are formed both ways:

- before (cache format 2): ``(image, flip, batch canvas h, w)``: the padded canvas changes with every shuffle;
- now (format 3): ``(image, flip, own canvas)``: the image padded to its own multiple of 32, a function of the
  image alone (``distill.teacher_cache._key``).

A key's first lookup is a teacher pass, the later ones hits, so entries per image and the hit rate follow from
the keys alone: no teacher needed, and the numbers are exact for the loader's batches. Target: teacher passes
<= 1.05 x the distinct (image, flip) pairs. Writes ``bench/results/cache_hits.json|md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ablation_plan import Plan, prepare_data
from report import save

from distill.data.dataset import build_loaders, set_epoch
from distill.teacher_cache import _key


def count(data_dir: Path, size: tuple[int, int], batch: int, epochs: int) -> dict:
    train, _, _ = build_loaders(data_dir, 0.0, 0, size, batch, 0)
    old, new, pairs, lookups = set(), set(), set(), 0
    for epoch in range(epochs):
        set_epoch(train, epoch)
        for images, targets in train:
            h, w = images.shape[-2:]
            for t in targets:
                lookups += 1
                old.add((int(t["image_id"]), bool(t["flipped"]), h, w))
                new.add(_key(t, h, w))
                pairs.add((int(t["image_id"]), bool(t["flipped"])))
    n = len(train.dataset)
    return {
        "images": n,
        "lookups": lookups,
        "pairs": len(pairs),
        "before": {"entries_per_image": round(len(old) / n, 2), "hit_rate": round(1 - len(old) / lookups, 3),
                   "passes_over_pairs": round(len(old) / len(pairs), 3)},
        "now": {"entries_per_image": round(len(new) / n, 2), "hit_rate": round(1 - len(new) / lookups, 3),
                "passes_over_pairs": round(len(new) / len(pairs), 3)},
    }  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 320), metavar=("LONG", "SHORT"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)
    size = (max(args.size), min(args.size))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="ld-cache-hits-") as work:
        for name in ("raccoon", "bccd"):
            data_dir = prepare_data(Plan(dataset=name), Path(work))
            rows[name] = count(data_dir, size, args.batch, args.epochs)
            print(name, rows[name], flush=True)
    lines = [
        "# Teacher cache hits on real photos: the old key (batch canvas) against the new (the image's own canvas)",
        "",
        f"Keep-ratio resize to {size[0]}x{size[1]}, batch {args.batch}, {args.epochs} epochs, random flip, batches "
        "grouped by aspect ratio; counted from the loader's own batches (no teacher needed: a key's first lookup is "
        "the teacher pass).",
        "",
        "| data set | images | (image, flip) pairs | lookups | entries per image, before | hit rate, before "
        "| passes / pairs, before | entries per image, now | hit rate, now | passes / pairs, now (target <= 1.05) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        b, n = r["before"], r["now"]
        verdict = "met" if n["passes_over_pairs"] <= 1.05 else "NOT met"
        lines.append(
            f"| {name} | {r['images']} | {r['pairs']} | {r['lookups']} | {b['entries_per_image']} | {b['hit_rate']} "
            f"| {b['passes_over_pairs']} | {n['entries_per_image']} | {n['hit_rate']} | {n['passes_over_pairs']} "
            f"({verdict}) |"
        )
    md = save("cache_hits", {"settings": vars(args), "rows": rows}, "\n".join(lines))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

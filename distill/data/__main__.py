"""Dataset tools on the command line (torch-free).

    python -m distill.data check DIR_OR_JSON            # validate, print counts and every problem
    python -m distill.data import-voc ROOT OUT_DIR [--split train=CSV --split val=CSV]
                                       [--image-set trainval=train --image-set test=test]
    python -m distill.data synthetic OUT_DIR [--train N --val N --size W H --seed S]

``check`` exits 1 when the dataset cannot be read or has no usable image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.data import synthetic
from distill.data.annotations import DatasetError, load_coco
from distill.data.voc import import_voc


def _check(path: Path) -> int:
    try:
        data = load_coco(path)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(data.summary(), indent=2))
    for p in data.problems:
        print(f"problem: {p}")
    for w in data.warnings:
        print(f"warning: {w}")
    return 0 if data.images else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synthetic"]:
        synthetic.main(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m distill.data", description="dataset tools")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("synthetic", help="make the synthetic digit set (see python -m distill.data.synthetic -h)")
    check = sub.add_parser("check", help="validate a COCO dataset folder or JSON file")
    check.add_argument("path", type=Path)
    voc = sub.add_parser("import-voc", help="Pascal VOC XML + images -> a COCO dataset folder")
    voc.add_argument("root", type=Path)
    voc.add_argument("out_dir", type=Path)
    voc.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=CSV",
        help="mark the images listed in CSV's 'filename' column with split NAME",
    )
    voc.add_argument(
        "--image-set",
        action="append",
        default=[],
        metavar="LIST=SPLIT",
        help="ImageSets/Main/LIST.txt gives split SPLIT (replaces the default train/val/test)",
    )
    a = p.parse_args(argv)
    if a.command == "check":
        return _check(a.path)
    splits = dict(s.split("=", 1) for s in a.split)
    try:
        image_sets = dict(s.split("=", 1) for s in a.image_set) or None
        coco = import_voc(a.root, a.out_dir, splits=splits, image_sets=image_sets)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(coco['images'])} images, {len(coco['annotations'])} boxes, "
        f"{len(coco['categories'])} classes to {a.out_dir}"
    )
    return _check(a.out_dir)


if __name__ == "__main__":
    sys.exit(main())

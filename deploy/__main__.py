"""``python -m deploy``: export a checkpoint to ONNX, run detections, publish into a registry.

    python -m deploy export CHECKPOINT OUT_DIR [--formats fp32,int8,fp16] [--calibration DATASET_DIR]
                            [--dataset DATASET_DIR [--val-split 0.2] [--seed 0]] [--backend onnxruntime|openvino]
                            [--sample IMAGE ...]
    python -m deploy predict MODEL_DIR IMAGE... [--draw OUT.png] [--threads N] [--backend openvino]
    python -m deploy publish MODEL_DIR REGISTRY_ROOT [--id ID]

``export`` needs torch; ``predict`` and ``publish`` do not (they never import it). ``export`` prints the
model's description (architecture, verification, graph, and per format its AP on ``--dataset``'s
validation split, measured by ``--backend``) as JSON; fp32 goes into OUT_DIR, int8 and fp16 into
OUT_DIR/int8 and OUT_DIR/fp16, each folder holding only what ``predict`` needs (``model.onnx``,
``model.json``). int8 calibrates on ``--calibration``'s (else ``--dataset``'s) training pictures, or without
either on the built-in sample pictures (the description says so).
Exit status: 0 on success, 2 for bad input (unreadable image or checkpoint, tampered model), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from deploy.export import ExportError, export_model

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if "int8" in formats and args.calibration is None and args.dataset is None:
        print(
            "note: int8 calibrates on the built-in verification pictures (no --calibration DATASET_DIR given)",
            file=sys.stderr,
        )
    try:
        description = export_model(
            args.checkpoint,
            args.out_dir,
            formats=formats,
            samples=args.sample or None,
            dataset=args.dataset,
            val_split=args.val_split,
            seed=args.seed,
            calibration=args.calibration,
            backend=args.backend,
        )
    except ExportError as e:
        print(f"error: export failed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a request that cannot be met (an unknown format): said, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out_dir": str(args.out_dir), **description}, indent=2))
    return 0


def _draw_path(out: Path, index: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")


def _predict(args: argparse.Namespace) -> int:
    from deploy.runtime import Predictor

    predictor = Predictor(args.model_dir, backend=args.backend, intra_op_threads=args.threads)
    blobs = []
    for path in args.images:
        try:
            blobs.append(Path(path).read_bytes())
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    results = predictor.predict(blobs)
    out = []
    for i, (path, dets) in enumerate(zip(args.images, results, strict=True)):
        dets = [d for d in dets if d["score"] >= args.min_score]
        out.append(
            {
                "image": str(path),
                "detections": [
                    {**d, "box": [round(v, 2) for v in d["box"]], "score": round(d["score"], 4)} for d in dets
                ],
            }
        )
        if args.draw:
            from deploy.draw import draw_detections
            from deploy.runtime import load_image

            target = _draw_path(Path(args.draw), i, len(args.images))
            draw_detections(load_image(blobs[i], predictor.max_pixels, str(path)), dets).save(target)
            out[-1]["drawn"] = str(target)
    print(json.dumps(out, indent=2))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from deploy.registry import Registry

    info = Registry(args.registry).publish(args.model_dir, model_id=args.id)
    print(json.dumps({"id": info["id"], "path": str(Path(args.registry) / info["id"]), "sha256": info["sha256"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export a checkpoint (ours of any family, or mmdetection GFL) to ONNX, verified")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--formats", default="fp32", help="comma-separated: fp32 (always), int8 (CPU), fp16 (GPU)")
    p.add_argument(
        "--calibration",
        metavar="DATASET_DIR",
        default=None,
        help="int8: calibrate on this data set's training pictures",
    )
    p.add_argument(
        "--dataset",
        metavar="DATASET_DIR",
        default=None,
        help="measure each format's AP on this data set's validation split",
    )
    p.add_argument("--val-split", type=float, default=0.2, help="as the training job split the data set")
    p.add_argument("--seed", type=int, default=0, help="as the training job split the data set")
    p.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "openvino"],
        help="the runtime that measures the AP (the one that will serve the model)",
    )
    p.add_argument("--sample", nargs="+", metavar="IMAGE", help="images to verify on (default: built-in ones)")
    p.set_defaults(fn=_export)
    p = sub.add_parser("predict", help="detections of an exported model on images, as JSON")
    p.add_argument("model_dir")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with its boxes (OUT_i.png for several)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"])
    p.add_argument("--min-score", type=float, default=0.0, help="drop detections below this score")
    p.set_defaults(fn=_predict)
    p = sub.add_parser("publish", help="publish an exported model folder into a registry folder")
    p.add_argument("model_dir")
    p.add_argument("registry")
    p.add_argument("--id", default=None)
    p.set_defaults(fn=_publish)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ImageError, ModelIntegrityError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

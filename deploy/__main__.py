"""``python -m deploy``: export a checkpoint to ONNX, run detections, publish into a registry.

    python -m deploy export CHECKPOINT OUT_DIR [--fp16] [--sample IMAGE ...]
    python -m deploy predict MODEL_DIR IMAGE... [--draw OUT.png] [--threads N]
    python -m deploy publish MODEL_DIR REGISTRY_ROOT [--id ID]

``export`` needs torch; ``predict`` and ``publish`` do not (they never import it). ``export`` prints the
model's description (architecture, verification, graph) as JSON; the folder keeps only what ``predict``
needs (``model.onnx``, ``model.json``).
Exit status: 0 on success, 2 for bad input (unreadable image or checkpoint, tampered model), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from deploy.export import ExportError, export_model

    try:
        description = export_model(args.checkpoint, args.out_dir, fp16=args.fp16, samples=args.sample or None)
    except ExportError as e:
        print(f"error: export failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out_dir": str(args.out_dir), **description}, indent=2))
    return 0


def _draw_path(out: Path, index: int, count: int) -> Path:
    return out if count == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")


def _predict(args: argparse.Namespace) -> int:
    from deploy.runtime import Predictor

    predictor = Predictor(args.model_dir, intra_op_threads=args.threads)
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
        out.append({"image": str(path), "detections": [
            {**d, "box": [round(v, 2) for v in d["box"]], "score": round(d["score"], 4)} for d in dets]})
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
    p = sub.add_parser("export", help="export a checkpoint (project or mmdetection GFL) to ONNX, verified")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--fp16", action="store_true", help="half-precision weights and compute (GPU serving)")
    p.add_argument("--sample", nargs="+", metavar="IMAGE", help="images to verify on (default: built-in ones)")
    p.set_defaults(fn=_export)
    p = sub.add_parser("predict", help="detections of an exported model on images, as JSON")
    p.add_argument("model_dir")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with its boxes (OUT_i.png for several)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
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

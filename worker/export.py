"""``python -m worker.export MODEL_PT OUT_DIR --meta META.json``: the worker's export child.

Runs ``deploy.export.export_model`` in its own process, so torch and the ONNX tooling are loaded
there and never in the worker (which stays light and long-lived). Exit 0 with ``OUT_DIR/model.onnx``
and ``OUT_DIR/model.json``; exit 1 with ``OUT_DIR/../error.json`` saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.export")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--meta", type=Path, help="JSON object added to model.json")
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args(argv)
    meta = json.loads(args.meta.read_text()) if args.meta else None
    try:
        from deploy.export import export_model

        export_model(args.checkpoint, args.out_dir, fp16=args.fp16, extra_meta=meta)
    except Exception as e:
        traceback.print_exc()
        error = {"error": f"ONNX export failed: {type(e).__name__}: {e}"}
        (args.out_dir.parent / "error.json").write_text(json.dumps(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

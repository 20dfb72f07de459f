"""``python -m worker.export MODEL_PT OUT_DIR DESCRIPTION_JSON``: the worker's export child.

Runs ``deploy.export.export_model`` in its own process, so torch and the ONNX tooling are loaded there
and never in the worker (which stays light and long-lived; nothing in the worker imports this module).
Exit 0 with ``OUT_DIR/model.onnx`` and ``OUT_DIR/model.json`` (what the runtime needs) and the model's
description in ``DESCRIPTION_JSON`` (what the store's catalogue keeps, see ``worker.publish``);
exit 1 with ``OUT_DIR/../error.json`` saying why.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from deploy.export import export_model
from distill.files import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.export")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("description", type=Path, help="where to write the model's description (JSON)")
    parser.add_argument("--fp16", action="store_true")
    args = parser.parse_args(argv)
    try:
        description = export_model(args.checkpoint, args.out_dir, fp16=args.fp16)
    except Exception as e:
        traceback.print_exc()
        atomic_write_json(args.out_dir.parent / "error.json", {"error": f"ONNX export failed: {type(e).__name__}: {e}"})
        return 1
    atomic_write_json(args.description, description)
    return 0


if __name__ == "__main__":
    sys.exit(main())

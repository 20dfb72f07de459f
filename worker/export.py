"""``python -m worker.export MODEL_PT OUT_DIR DESCRIPTION_JSON [--spec SPEC_JSON] [--backend B] [--providers P]``:
the worker's export child.

Runs ``deploy.export.export_model`` in its own process, so torch and the ONNX tooling are loaded there
and never in the worker (which stays light and long-lived; nothing in the worker imports this module).
``--spec`` is the job's local spec (``runs/<job>/spec.json``): its ``export.formats`` say which formats to
make, its data set folder, ``val_split`` and ``split_seed`` give int8 its calibration pictures (training split)
and every format its AP (validation split, as training split it), measured by ``--backend`` with
``--providers``: the runtime that will serve the model (``LDD_BACKEND``, ``LDD_PROVIDERS``).
Exit 0 with ``OUT_DIR/model.onnx`` and ``OUT_DIR/model.json`` (what the runtime needs; other formats in
``OUT_DIR/<format>/``) and the models' description in ``DESCRIPTION_JSON`` (what the store's catalogue
keeps, see ``worker.publish``); exit 1 with ``OUT_DIR/../error.json`` saying why.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--spec", type=Path, default=None, help="the job's local spec (formats, data set, split)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--providers", default="", help="comma-separated ONNX Runtime providers")
    args = parser.parse_args(argv)
    try:
        spec = json.loads(args.spec.read_text()) if args.spec else {}
        description = export_model(
            args.checkpoint, args.out_dir, formats=(spec.get("export") or {}).get("formats") or ["fp32"],
            dataset=spec.get("dataset"), val_split=float(spec.get("val_split", 0.2)),
            seed=int(spec.get("split_seed", 0)),  # the data set's split seed, never the job's training seed
            backend=args.backend, providers=[p for p in args.providers.split(",") if p] or None,
        )  # fmt: skip
    except Exception as e:
        traceback.print_exc()
        atomic_write_json(args.out_dir.parent / "error.json", {"error": f"ONNX export failed: {type(e).__name__}: {e}"})
        return 1
    atomic_write_json(args.description, description)
    return 0


if __name__ == "__main__":
    sys.exit(main())

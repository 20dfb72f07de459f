"""``python -m distill train SPEC.json --out RUN_DIR``: run one job from its JSON spec.

Exit codes: 0 done; 1 the job failed (reason in ``RUN_DIR/error.json``); 2 bad spec; 143 stopped by a
signal (a checkpoint was written; running the same command again resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from distill.spec import LocalJobSpec


def _fail(out: Path, message: str, code: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.json").write_text(json.dumps({"error": message}))
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train or distil a detector from a job spec")
    train.add_argument("spec", type=Path, help="job spec JSON (the body of POST /v1/jobs, with local paths: "
                       "a dataset folder, teacher {'path': file}, student init {'path': file})")
    train.add_argument("--out", type=Path, required=True, help="run folder (resumed if it holds a checkpoint)")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    train.add_argument("--weights-dir", default=None,
                       help="cache of torchvision's ImageNet weights (default: $TORCH_HOME/hub/checkpoints)")
    train.add_argument("--min-free-bytes", type=int, default=0,
                       help="stop (exit 1) rather than write a checkpoint that would leave less free space")
    args = parser.parse_args(argv)

    try:
        spec = LocalJobSpec.model_validate_json(args.spec.read_text())
    except (OSError, ValidationError) as e:
        return _fail(args.out, f"invalid job spec {args.spec}: {e}", 2)

    from distill.files import NoRoom
    from distill.train import Stopped, TrainingError, run

    (args.out / "error.json").unlink(missing_ok=True)
    try:
        metrics = run(spec, args.out, device=args.device, weights_dir=args.weights_dir,
                      min_free_bytes=args.min_free_bytes)
    except Stopped as e:
        return _fail(args.out, str(e), 143)
    except (TrainingError, ValueError, FileNotFoundError, NoRoom) as e:
        return _fail(args.out, str(e), 1)
    except Exception as e:  # the worker shows this to the user; keep the trace in the log
        with open(args.out / "train.log", "a") as log:
            log.write(traceback.format_exc())
        return _fail(args.out, f"{type(e).__name__}: {e}", 1)
    print(json.dumps(metrics["bbox"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

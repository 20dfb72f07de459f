"""``python -m distill train SPEC.json --out RUN_DIR``: run one job from its JSON spec.

One job over N processes (``schedule.gpus``; the worker launches it so)::

    python -m torch.distributed.run --standalone --nproc_per_node N -m distill train SPEC.json --out RUN_DIR

Exit codes: 0 done; 1 the job failed (reason in ``RUN_DIR/error.json``), or, without ``error.json``, a
process of a multi-process job lost its group (another rank died or hung: nothing wrong with the job, try
again); 2 bad spec; 143 stopped by a signal (a checkpoint was written; running the same command again
resumes, with any number of processes). ``torchrun`` itself exits 1 when any rank fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from distill.spec import LocalJobSpec


def killed_from_outside(e: BaseException) -> bool:
    """Whether ``e`` says a process of the run was killed from outside (the OOM killer, an operator), not that
    the job is wrong: a DataLoader worker that died by a signal. Such a failure is retried; any other is the
    job's own (a diverged loss, bad data) and fails it at once."""
    text = str(e)
    return (
        isinstance(e, RuntimeError)
        and "DataLoader worker" in text
        and ("killed by signal" in text or "exited unexpectedly" in text)
    )


def _fail(out: Path, message: str, code: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.json").write_text(json.dumps({"error": message}))
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train or distil a detector from a job spec")
    train.add_argument(
        "spec",
        type=Path,
        help="job spec JSON (the body of POST /v1/jobs, with local paths: "
        "a dataset folder, teacher {'path': file}, student init {'path': file})",
    )
    train.add_argument("--out", type=Path, required=True, help="run folder (resumed if it holds a checkpoint)")
    train.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 (default: cuda if available; under "
        "torchrun, cuda means each rank's own GPU, cuda:LOCAL_RANK)",
    )
    train.add_argument(
        "--weights-dir",
        default=None,
        help="cache of torchvision's ImageNet weights (default: $TORCH_HOME/hub/checkpoints)",
    )
    train.add_argument(
        "--min-free-bytes",
        type=int,
        default=0,
        help="stop (exit 1) rather than write a checkpoint that would leave less free space",
    )
    train.add_argument(
        "--report-every-s", type=float, default=2.0, help="seconds between progress records (0: one per step)"
    )
    args = parser.parse_args(argv)

    try:
        spec = LocalJobSpec.model_validate_json(args.spec.read_text())
    except (OSError, ValidationError) as e:
        return _fail(args.out, f"invalid job spec {args.spec}: {e}", 2)

    import torch.distributed as dist

    from distill import ddp
    from distill.files import NoRoom
    from distill.train import Stopped, TrainingError, run

    if not ddp.launched():  # under torchrun the launcher clears it: a rank must not erase another's verdict
        (args.out / "error.json").unlink(missing_ok=True)
    try:
        device = ddp.setup(args.device)
        metrics = run(
            spec,
            args.out,
            device=device,
            weights_dir=args.weights_dir,
            min_free_bytes=args.min_free_bytes,
            report_every_s=args.report_every_s,
        )
    except Stopped as e:  # not a verdict on the job: no error.json
        print(f"stopped: {e}", file=sys.stderr)
        return 143
    except (ddp.GroupLost, dist.DistError) as e:
        # Another rank died or hung (torchrun stops the group next): no verdict, so the attempt is retried.
        print(f"lost the process group: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except (TrainingError, ValueError, FileNotFoundError, NoRoom) as e:
        return _fail(args.out, str(e), 1)
    except Exception as e:  # the worker shows this to the user; keep the trace in the log
        with open(args.out / "train.log", "a") as log:
            log.write(traceback.format_exc())
        if killed_from_outside(e):  # no verdict on the job: the worker tries again from the last checkpoint
            print(f"killed from outside: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        return _fail(args.out, f"{type(e).__name__}: {e}", 1)
    ddp.teardown()  # only here: leaving a group that lost a rank can block (NCCL); exiting needs no teardown
    if metrics:  # rank 0's (the other ranks of a multi-process job return nothing)
        print(json.dumps(metrics["bbox"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job, end to end, through the REST API (``python -m api.demo``; ``scripts/demo.sh``).

1. starts the service in its embedded mode (API + one worker; SQLite, local folders, filesystem broker)
   in a fresh data folder (``--data-dir`` or a temporary one);
2. makes the synthetic digits set and uploads it;
3. trains a teacher, then a plain student and a distilled student (LD + VLR + KD) of the same
   architecture, each through ``POST /v1/jobs`` with a progress bar from the job's server-sent events;
4. calls ``/detect`` on a validation image (and times it), writes the image with its boxes;
5. prints the AP of teacher, student and distilled student, and the detect latency.

The defaults fit the 2-core CPU this project is developed on (about 10-15 minutes); ``--quick`` is a
smoke run of a couple of minutes, useless for accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from api.cli import api_command, progress_line, stop_processes, worker_command
from api.client import Client
from deploy.draw import draw_detections
from distill.spec import ARCHITECTURES


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(data_dir: Path, port: int) -> list[subprocess.Popen]:
    """``ldd up`` in the background: the API and one worker, their logs under ``data_dir/logs``."""
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LDD_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    procs = []
    for name, cmd in (("worker", worker_command()), ("api", api_command("127.0.0.1", port))):
        with open(logs / f"{name}.log", "wb") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def follow(client: Client, job_id: str, label: str) -> dict[str, Any]:
    """A progress bar for one job from its server-sent events; returns the finished job."""
    tty = sys.stderr.isatty()
    job = client.get_job(job_id)
    last = ""
    for _, job in client.events(job_id):
        line = f"{label:<18s} {progress_line(job, width=24)}"
        if tty:
            sys.stderr.write("\r" + line.ljust(120)[:120])
        elif line.split(" loss")[0] != last:  # logs: one line per step of progress, not per event
            sys.stderr.write(line + "\n")
            last = line.split(" loss")[0]
        sys.stderr.flush()
    if tty:
        sys.stderr.write("\n")
    if job["state"] not in ("succeeded", "failed", "cancelled"):
        job = client.wait(job_id)
    if job["state"] != "succeeded":
        raise SystemExit(f"{label} job {job_id} {job['state']}: {job.get('error')}")
    return job


def schedule(epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": args.batch_size, "image_size": [max(args.size), min(args.size)],
            "lr": args.lr, "warmup_iters": args.warmup_iters, "num_workers": 0}  # fmt: skip


def seconds(job: dict[str, Any]) -> float | None:
    from datetime import datetime

    if not job.get("started_at") or not job.get("finished_at"):
        return None
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI timeout, `kill`) stops the service the same way Ctrl-C does, leaving no worker behind.
    signal.signal(signal.SIGTERM, _interrupt)
    p = argparse.ArgumentParser(prog="python -m api.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data-dir", help="service data folder (default: a new temporary folder, kept)")
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--train-images", type=int, default=160)
    p.add_argument("--val-images", type=int, default=40)
    p.add_argument("--size", type=int, nargs=2, default=[256, 192], metavar=("W", "H"), help="image size")
    p.add_argument("--student-arch", default="gfl_tiny")
    p.add_argument("--teacher-arch", default="gfl_small" if "gfl_small" in ARCHITECTURES else "gfl_tiny",
                   help="a wider network than the student where one is defined")  # fmt: skip
    p.add_argument("--teacher-epochs", type=int, default=24)
    p.add_argument("--student-epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--warmup-iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: few images, one epoch each")
    args = p.parse_args(argv)
    if args.quick:
        args.train_images, args.val_images, args.teacher_epochs, args.student_epochs = 24, 8, 1, 1
        args.warmup_iters = 5

    t0 = time.monotonic()
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="ldd-demo-")).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"== LD service demo: data in {data_dir}, API on {url} (docs at {url}/docs)", file=sys.stderr)
    procs = start_service(data_dir, port)
    try:
        from distill.data.synthetic import make_synthetic

        synthetic = make_synthetic(data_dir / "synthetic", num_train=args.train_images, num_val=args.val_images,
                                   image_size=tuple(args.size), seed=args.seed)  # fmt: skip
        client = Client(url, timeout=600)
        client.wait_ready(120)
        ds = client.upload_dataset(synthetic, name="synthetic digits")
        print(f"== dataset {ds['id']}: {ds['num_images']} images, {ds['num_boxes']} boxes, "
              f"{len(ds['classes'])} classes, splits {ds['splits']}", file=sys.stderr)  # fmt: skip

        base = {"dataset": ds["id"], "seed": args.seed}
        teacher = client.submit_job({**base, "kind": "train", "name": "teacher",
                                     "student": {"arch": args.teacher_arch},
                                     "schedule": schedule(args.teacher_epochs, args)})  # fmt: skip
        teacher = follow(client, teacher["id"], f"teacher {args.teacher_arch}")
        # Both students are queued at once; the worker runs one job at a time.
        plain = client.submit_job({**base, "kind": "train", "name": "student",
                                   "student": {"arch": args.student_arch},
                                   "schedule": schedule(args.student_epochs, args)})  # fmt: skip
        distilled = client.submit_job({**base, "kind": "distill", "name": "distilled student",
                                       "student": {"arch": args.student_arch}, "teacher": {"job": teacher["id"]},
                                       "schedule": schedule(args.student_epochs, args)})  # fmt: skip
        plain = follow(client, plain["id"], f"student {args.student_arch}")
        distilled = follow(client, distilled["id"], "distilled (LD+VLR)")

        # /detect on a validation image with the distilled student (the newest model).
        coco = json.loads((synthetic / "annotations.json").read_text())
        val = next(im for im in coco["images"] if im.get("split") == "val")
        image = synthetic / val["file_name"]
        result = client.detect(image)
        assert result["model"] == distilled["model_id"]
        times, server = [], []
        for _ in range(20):
            t = time.perf_counter()
            server.append(client.detect(image)["latency_ms"])
            times.append((time.perf_counter() - t) * 1000)
        drawn = data_dir / "demo_detections.png"
        draw_detections(image, result["detections"], min_score=0.3).save(drawn)

        rows = [("teacher", args.teacher_arch, teacher), ("student", args.student_arch, plain),
                ("distilled student", args.student_arch, distilled)]  # fmt: skip
        print("\n| model | architecture | AP | AP50 | AP75 | training (s) | model id |")
        print("|---|---|---:|---:|---:|---:|---|")
        for name, arch, job in rows:
            bbox = (job.get("metrics") or {}).get("bbox") or {}
            dur = seconds(job)
            print(
                f"| {name} | {arch} | {bbox.get('AP', float('nan')):.3f} | {bbox.get('AP50', float('nan')):.3f} | "
                f"{bbox.get('AP75', float('nan')):.3f} | {dur or float('nan'):.0f} | {job['model_id']} |"
            )
        ap = [((j.get("metrics") or {}).get("bbox") or {}).get("AP", 0.0) for _, _, j in rows]
        print(f"\ndistilled - plain student: {ap[2] - ap[1]:+.3f} AP (one seed; bench/ablation.py averages seeds)")
        print(f"/detect on {image.name} ({result['image_size'][0]}x{result['image_size'][1]}): "
              f"{len(result['detections'])} detections, {sum(d['score'] >= 0.3 for d in result['detections'])} "
              f"with score >= 0.3")  # fmt: skip
        print(f"/detect latency over 20 calls: median {statistics.median(times):.1f} ms round trip "
              f"(server {statistics.median(server):.1f} ms)")  # fmt: skip
        print(f"image with boxes: {drawn}")
        print(f"total time: {(time.monotonic() - t0) / 60:.1f} min; service logs in {data_dir / 'logs'}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the service", file=sys.stderr)
        return 130
    finally:
        stop_processes(procs)


if __name__ == "__main__":
    sys.exit(main())

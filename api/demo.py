"""The main job, end to end, through the REST API (``python -m api.demo``; ``scripts/demo.sh``).

1. starts the service in its embedded mode (API + one worker; SQLite, local folders, filesystem broker)
   in a fresh data folder (``--data-dir`` or a temporary one);
2. makes the synthetic digits set and uploads it;
3. trains a teacher, then a plain student and a distilled student (LD + VLR + KD) of the same
   architecture, each through ``POST /v1/jobs`` with a progress bar from the job's server-sent events;
4. calls ``/detect`` with each published model on a validation image (and times it), and writes that image
   with the distilled student's boxes;
5. prints AP, AP50, AP75 and the detect latency of teacher, student and distilled student, and what they mean.

The task is chosen so that the models are detectors after a few minutes of a 2-core CPU: one class (the
digit 0), 24-56 px digits, 1-4 per image, 160x128 images, a teacher trained 15 epochs and students 6. The
defaults run in under 10 minutes there (first install not counted); ``--quick`` is a smoke run of a couple
of minutes, useless for accuracy. The real comparison, over seeds and on real photos, is
``bench/ablation.py``.
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

from PIL import Image

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
    # OpenMP threads that spin while they wait for work turn a busy CPU's every step into a fight: measured
    # on the loaded 2-core machine, a gfl_small training step took 7 s with torch's 2 default threads and
    # 0.6 s with passive waiting (1 thread: 0.5-0.9 s). Idle threads that sleep cost nothing on a quiet one.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def schedule(epochs: int, lr: float, args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": args.batch_size, "image_size": [max(args.size), min(args.size)],
            "lr": lr, "warmup_iters": args.warmup_iters, "num_workers": 0}  # fmt: skip


def seconds(job: dict[str, Any]) -> float | None:
    from datetime import datetime

    if not job.get("started_at") or not job.get("finished_at"):
        return None
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def covered(truth: list[list[float]], detections: list[dict[str, Any]], min_score: float = 0.3) -> int:
    """How many ground-truth boxes ``[x, y, w, h]`` a detection with ``score >= min_score`` overlaps with
    IoU >= 0.5 (each detection counted once, best scores first)."""
    boxes = [d["box"] for d in sorted(detections, key=lambda d: -d["score"]) if d["score"] >= min_score]
    found = 0
    for x, y, w, h in truth:
        for k, (x1, y1, x2, y2) in enumerate(boxes):
            iw, ih = min(x + w, x2) - max(x, x1), min(y + h, y2) - max(y, y1)
            inter = max(iw, 0) * max(ih, 0)
            if inter / (w * h + (x2 - x1) * (y2 - y1) - inter) >= 0.5:
                found += 1
                del boxes[k]
                break
    return found


def timed_detect(client: Client, image: Path, model_id: str, n: int = 20) -> tuple[dict[str, Any], float, float]:
    """``/v1/models/{id}/detect`` once to warm up, then ``n`` times: the first answer, and the median round
    trip and server-side time in ms."""
    result = client.detect(image, model=model_id)
    times, server = [], []
    for _ in range(n):
        t = time.perf_counter()
        server.append(client.detect(image, model=model_id)["latency_ms"])
        times.append((time.perf_counter() - t) * 1000)
    return result, statistics.median(times), statistics.median(server)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a CI timeout, `kill`) stops the service the same way Ctrl-C does, leaving no worker behind.
    signal.signal(signal.SIGTERM, _interrupt)
    p = argparse.ArgumentParser(prog="python -m api.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data-dir", help="service data folder (default: a new temporary folder, kept)")
    p.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    p.add_argument("--train-images", type=int, default=320)
    p.add_argument("--val-images", type=int, default=120)
    p.add_argument("--size", type=int, nargs=2, default=[160, 128], metavar=("W", "H"), help="image size")
    p.add_argument("--classes", type=int, default=1, help="digits 0..N-1 as classes (1: the digit 0 alone)")
    p.add_argument("--object-size", type=int, nargs=2, default=[24, 56], metavar=("MIN", "MAX"),
                   help="digit height range in pixels")  # fmt: skip
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--student-arch", default="gfl_tiny")
    p.add_argument("--teacher-arch", default="gfl_small" if "gfl_small" in ARCHITECTURES else "gfl_tiny",
                   help="a wider network than the student where one is defined")  # fmt: skip
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student-epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--teacher-lr", type=float, default=0.02)
    p.add_argument("--student-lr", type=float, default=0.02)
    p.add_argument("--warmup-iters", type=int, default=100)
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
                                   image_size=tuple(args.size), num_classes=args.classes,
                                   min_size=args.object_size[0], max_size=args.object_size[1],
                                   max_objects=args.max_objects, seed=args.seed)  # fmt: skip
        client = Client(url, timeout=600)
        client.wait_ready(120)
        ds = client.upload_dataset(synthetic, name="synthetic digits")
        print(f"== dataset {ds['id']}: {ds['num_images']} images, {ds['num_boxes']} boxes, "
              f"{len(ds['classes'])} classes, splits {ds['splits']}", file=sys.stderr)  # fmt: skip

        base = {"dataset": ds["id"], "seed": args.seed}
        teacher = client.submit_job({**base, "kind": "train", "name": "teacher",
                                     "student": {"arch": args.teacher_arch},
                                     "schedule": schedule(args.teacher_epochs, args.teacher_lr, args)})  # fmt: skip
        teacher = follow(client, teacher["id"], f"teacher {args.teacher_arch}")
        # Both students are queued at once; the worker runs one job at a time.
        student_schedule = schedule(args.student_epochs, args.student_lr, args)
        plain = client.submit_job({**base, "kind": "train", "name": "student",
                                   "student": {"arch": args.student_arch}, "schedule": student_schedule})  # fmt: skip
        distilled = client.submit_job({**base, "kind": "distill", "name": "distilled student",
                                       "student": {"arch": args.student_arch}, "teacher": {"job": teacher["id"]},
                                       "schedule": student_schedule})  # fmt: skip
        plain = follow(client, plain["id"], f"student {args.student_arch}")
        distilled = follow(client, distilled["id"], "distilled (LD+VLR)")

        # /detect with each model on the validation image with the most digits; the picture shows the
        # distilled student's boxes with a score of 0.3 or more.
        coco = json.loads((synthetic / "annotations.json").read_text())
        val_ids = [im["id"] for im in coco["images"] if im.get("split") == "val"]
        truth = {i: [a["bbox"] for a in coco["annotations"] if a["image_id"] == i] for i in val_ids}
        val = max(val_ids, key=lambda i: len(truth[i]))
        image = synthetic / next(im["file_name"] for im in coco["images"] if im["id"] == val)
        rows = [("teacher", args.teacher_arch, teacher), ("student", args.student_arch, plain),
                ("distilled student", args.student_arch, distilled)]  # fmt: skip
        detected = {name: timed_detect(client, image, job["model_id"]) for name, _, job in rows}
        result = detected["distilled student"][0]
        drawn = data_dir / "demo_detections.png"
        zoom = max(1, round(480 / max(args.size)))  # small images are drawn larger, so the labels can be read
        picture = Image.open(image).convert("RGB")
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.BICUBIC)
        zoomed = [{**d, "box": [v * zoom for v in d["box"]]} for d in result["detections"]]
        draw_detections(picture, zoomed, min_score=0.3).save(drawn)

        print("\n| model | architecture | AP | AP50 | AP75 | /detect ms (server) | training s | model id |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for name, arch, job in rows:
            bbox = (job.get("metrics") or {}).get("bbox") or {}
            _, round_trip, server = detected[name]
            dur = seconds(job)
            print(f"| {name} | {arch} | {bbox.get('AP', float('nan')):.3f} | {bbox.get('AP50', float('nan')):.3f} | "
                  f"{bbox.get('AP75', float('nan')):.3f} | {round_trip:.1f} ({server:.1f}) | "
                  f"{dur or float('nan'):.0f} | {job['model_id']} |")  # fmt: skip
        ap, ap75 = (
            [((j.get("metrics") or {}).get("bbox") or {}).get(m, 0.0) for _, _, j in rows] for m in ("AP", "AP75")
        )
        n_val = len(val_ids)
        print(f"""
What the numbers mean: AP is COCO box AP on the {n_val} validation images (mean over IoU thresholds 0.5
to 0.95; AP50 and AP75 at IoU 0.5 and 0.75), from 0 to 1. The teacher ({args.teacher_arch}) is a bigger
network trained {args.teacher_epochs} epochs; the student and the distilled student are the same
{args.student_arch} with the same {args.student_epochs}-epoch schedule and seed, so their difference,
{ap[2] - ap[1]:+.3f} AP ({ap75[2] - ap75[1]:+.3f} AP75), is what distillation from the teacher (LD + VLR
+ KD) added; LD teaches box edges, so its gain shows most at the strict IoU. One seed on a small synthetic
set: about 0.01-0.02 AP is seed noise. bench/ablation.py averages 3 seeds per row, on this kind of set and
on real photos (bench/results/ablation*.md). The distilled student keeps the student's architecture, so
its /detect time is the student's; the teacher's is the price of the bigger model.""")
        n_boxed = covered(truth[val], result["detections"])
        print(f"\n/detect on {image.name} ({result['image_size'][0]}x{result['image_size'][1]}) by the distilled "
              f"student: {sum(d['score'] >= 0.3 for d in result['detections'])} boxes with score >= 0.3, around "
              f"{n_boxed} of its {len(truth[val])} digits (IoU >= 0.5)")  # fmt: skip
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

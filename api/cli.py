"""``ldd``: run the service and talk to it.

    ldd up [--host 127.0.0.1] [--port 8000] [--data-dir DIR]   API + one supervised worker on this machine
    ldd api | ldd worker                                        one of the two
    ldd datasets upload PATH [--name N] [--val-split F] [--split-seed S] | ldd datasets list
    ldd checkpoints upload PATH                                 a detector or a ResNet backbone
    ldd jobs submit SPEC.json | ldd jobs submit --kind train --dataset ID [--arch A] [--init I] [--epochs N] ...
    ldd jobs status ID | watch ID | cancel ID | list
    ldd studies submit STUDY.json [--watch] | status ID | watch ID | report ID [--chart OUT.png] | cancel ID | list
    ldd models list | download ID OUT.onnx | ldd deployments create|update|rollback|list|show (api.cli_serving)
    ldd detect IMAGE [--model ID | --deployment NAME] [--score-threshold T] [--draw OUT.png]
    ldd datasets|checkpoints|jobs|studies|models|deployments delete ID

The client commands talk to the REST API like any client (``--url`` / ``LDD_URL``, ``LDD_API_KEY``).
``up`` uses the embedded defaults (SQLite, local artifacts, filesystem broker) unless ``LDD_*``
variables say otherwise, e.g. ``LDD_BROKER_URL=redis://...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from api import cli_serving
from api.client import TERMINAL_STATES, APIClientError, Client
from api.supervisor import Supervisor
from api.supervisor import stop_processes as stop_processes  # api.demo stops its children the same way
from distill.spec import ARCH_HELP


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ------------------------------------------------------------------------------------ server side


def _service_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if getattr(args, "data_dir", None):
        env["LDD_DATA_DIR"] = str(Path(args.data_dir).absolute())
    return env


def api_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", host, "--port", str(port),
            "--no-access-log"]  # fmt: skip


def worker_command() -> list[str]:
    return [sys.executable, "-m", "worker"]


def run_up(args: argparse.Namespace) -> int:
    """Start the API and one worker, restart the worker when it dies (``api.supervisor``); Ctrl-C stops both."""
    env = _service_env(args)
    data_dir = Path(env.get("LDD_DATA_DIR") or "./.ldd").absolute()
    sup = Supervisor(api_command(args.host, args.port), worker_command(), env, data_dir)
    print(f"ldd: API on http://{args.host}:{args.port} (docs at /docs) and one worker, restarted if it dies; "
          "Ctrl-C stops both", file=sys.stderr)  # fmt: skip
    return sup.run()


def run_api(args: argparse.Namespace) -> int:
    os.environ.update(_service_env(args))
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, access_log=False)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    env = _service_env(args)
    os.execve(sys.executable, worker_command(), env)  # the worker is its own program; become it


# ------------------------------------------------------------------------------------ client side


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, timeout=args.timeout)


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client(args) as c:
        up = args.action == "upload"
        _print(c.upload_dataset(args.path, args.name, args.val_split, args.split_seed) if up else c.list_datasets())
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _print(c.upload_checkpoint(args.path, name=args.name))
    return 0


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.spec:
        spec = json.loads(Path(args.spec).read_text())
        if not isinstance(spec, dict):
            raise SystemExit(f"{args.spec}: a job spec is a JSON object")
    else:
        if not args.kind or not args.dataset:
            raise SystemExit("ldd jobs submit: give SPEC.json, or --kind and --dataset")
        spec = {"kind": args.kind, "dataset": args.dataset}
    # Flags override the file, so one spec file can serve several runs.
    if args.kind:
        spec["kind"] = args.kind
    if args.dataset:
        spec["dataset"] = args.dataset
    if args.name:
        spec["name"] = args.name
    if args.arch:
        spec.setdefault("student", {})["arch"] = args.arch
    if args.init:
        init = {"none": None, "imagenet": "imagenet"}.get(args.init, {"checkpoint": args.init})
        spec.setdefault("student", {})["init"] = init
    for flag, key in (("teacher_model", "model"), ("teacher_job", "job"), ("teacher_checkpoint", "checkpoint")):
        if getattr(args, flag):
            spec["teacher"] = {key: getattr(args, flag)}
    sched = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr)) if v}
    if args.image_size:
        sched["image_size"] = args.image_size
    if sched:
        spec.setdefault("schedule", {}).update(sched)
    if args.seed is not None:
        spec["seed"] = args.seed
    return spec


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "submit":
            job = c.submit_job(spec_from_args(args), idempotency_key=args.idempotency_key)
            _print(job)
            return watch(c, job["id"]) if args.watch else 0
        if args.action == "status":
            _print(c.get_job(args.id))
        elif args.action == "cancel":
            _print(c.cancel_job(args.id))
        elif args.action == "list":
            for j in c.list_jobs(state=args.state):
                print(f"{j['id']}  {j['kind']:8s} {j['state']:10s} {j.get('name') or ''}")
        elif args.action == "watch":
            return watch(c, args.id)
    return 0


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    """``[#####.....]  45% epoch 3/12 iter 120/480 loss 0.831 eta 1m20s  running``"""
    p = job.get("progress") or {}
    total, done = p.get("total_iters") or 0, p.get("iter") or 0
    frac = min(1.0, done / total) if total else (1.0 if job["state"] == "succeeded" else 0.0)
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    parts = [f"[{bar}] {frac * 100:3.0f}%"]
    if p.get("epochs"):
        parts.append(f"epoch {p.get('epoch', 0)}/{p['epochs']}")
    if total:
        parts.append(f"iter {done}/{total}")
    losses = p.get("losses") or {}
    if losses and p.get("phase", "train") == "train":
        total_loss = losses.get("total", losses.get("loss"))
        if total_loss is None:
            total_loss = sum(v for v in losses.values() if isinstance(v, int | float))
        parts.append(f"loss {total_loss:.3f}")
    if p.get("eta_s") is not None and job["state"] == "running":
        eta = int(p["eta_s"])
        parts.append(f"eta {eta // 60}m{eta % 60:02d}s")
    if p.get("phase") and p.get("phase") != "train":
        parts.append(p["phase"])
    parts.append(job["state"])
    return " ".join(parts)


def watch(c: Client, job_id: str, out: Any = None) -> int:
    """A progress bar from the job's server-sent events; exit code 0 only if the job succeeded."""
    out = out or sys.stderr
    tty = out.isatty()
    job: dict[str, Any] = c.get_job(job_id)
    for _, job in c.events(job_id):
        line = progress_line(job)
        out.write(("\r" + line.ljust(110)) if tty else line + "\n")
        out.flush()
    if tty:
        out.write("\n")
    if job["state"] not in TERMINAL_STATES:  # the stream ended early (server restart): poll instead
        job = c.wait(job_id)
    if job["state"] == "succeeded":
        print(json.dumps({"id": job["id"], "state": job["state"], "model_id": job.get("model_id"),
                          "metrics": (job.get("metrics") or {}).get("bbox")}, indent=2))  # fmt: skip
        return 0
    print(f"job {job_id} {job['state']}: {job.get('error') or ''}", file=sys.stderr)
    return 1


def cmd_studies(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.action == "submit":
            study = c.submit_study(json.loads(Path(args.spec).read_text()), idempotency_key=args.idempotency_key)
            print(f"study {study['id']}: {study['progress']['jobs']} jobs queued", file=sys.stderr)
            if args.watch:
                return watch_study(c, study["id"])
            _print(study)
            return 0
        if args.action == "watch":
            return watch_study(c, args.id)
        if args.action == "report":
            if args.chart:
                Path(args.chart).write_bytes(c.study_report(args.id, chart=True))
            print(c.study_report(args.id).decode(), end="")
        elif args.action == "list":
            for st in c.list_studies():
                print(f"{st['id']}  {st['state']:10s} {st['progress']['ended']}/{st['progress']['jobs']} jobs  "
                      f"{st.get('name') or ''}")  # fmt: skip
        else:
            _print(c.cancel_study(args.id) if args.action == "cancel" else c.get_study(args.id))
    return 0


def watch_study(c: Client, study_id: str, poll: float = 2.0) -> int:
    """One line each time the study's jobs move, then its report table; exit code 0 only if it succeeded."""
    last = ""
    while True:
        st = c.get_study(study_id)
        running = [f"{j['row']} seed {j['seed']} {100 * (j.get('progress') or 0):.0f}%" for j in st["jobs"]
                   if j["state"] == "running"]  # fmt: skip
        line = (f"study {study_id} {st['state']}: {st['progress']['ended']}/{st['progress']['jobs']} jobs ended"
                + (f"; running: {', '.join(running)}" if running else ""))  # fmt: skip
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if st["state"] != "running":
            break
        time.sleep(poll)
    print(c.study_report(study_id).decode(), end="")
    return 0 if st["state"] == "succeeded" else 1


def cmd_delete(args: argparse.Namespace) -> int:
    """``ldd <resource> delete ID``: 409 names what still uses it (printed from the error's details)."""
    with _client(args) as c:
        c.delete(args.kind, args.id)
    print(f"deleted {args.kind[:-1]} {args.id}", file=sys.stderr)
    return 0


def add_delete(actions: Any, kind: str) -> None:
    d = actions.add_parser("delete", help="delete it (refused with what holds it while something uses it)")
    d.add_argument("id")
    d.set_defaults(func=cmd_delete, kind=kind)  # the action's own func wins over the resource command's


# ------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldd",
        description="LD service: distil, serve and call object detectors.",
        epilog="Client commands read LDD_URL (the API's address) and LDD_API_KEY (the key sent as 'Authorization: "
        "Bearer <key>' when the server sets LDD_API_KEYS; without it such a server answers 401).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def server(name: str, help: str, listens: bool = True) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--data-dir", help="artifact folder (default: $LDD_DATA_DIR or ./.ldd)")
        if listens:  # the commands that run the API
            s.add_argument("--host", default="127.0.0.1")
            s.add_argument("--port", type=int, default=8000)
        return s

    up_help = "run the API and one worker on this machine, the worker restarted if it dies (Ctrl-C stops both)"
    server("up", up_help).set_defaults(func=run_up)
    server("api", "run the API server only").set_defaults(func=run_api)
    worker_help = "run one worker only (one job at a time, from queues gpu..gpu.N for its N slots: LDD_WORKER_GPUS)"
    server("worker", worker_help, listens=False).set_defaults(func=run_worker)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--url", default=None, help="API address (default: $LDD_URL or http://127.0.0.1:8000)")
        c.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
        return c

    c = client("datasets", "upload or list datasets")
    a = c.add_subparsers(dest="action", required=True)
    u = a.add_parser("upload", help="upload a zip, or a folder (zipped for you)")
    u.add_argument("path")
    u.add_argument("--name")
    u.add_argument("--val-split", type=float, help="a data set whose images name no split: validation share (0.2)")
    u.add_argument("--split-seed", type=int, help="the seed of that draw (0); every job on the data set uses it")
    add_delete(a, "datasets")
    a.add_parser("list")
    c.set_defaults(func=cmd_datasets)

    c = client("checkpoints", "upload a detector checkpoint (a teacher) or a ResNet backbone (initial weights)")
    a = c.add_subparsers(dest="action", required=True)
    u = a.add_parser("upload")
    u.add_argument("path")
    u.add_argument("--name")
    add_delete(a, "checkpoints")
    c.set_defaults(func=cmd_checkpoints)

    c = client("jobs", "submit and follow jobs")
    a = c.add_subparsers(dest="action", required=True)
    s = a.add_parser("submit", help="submit SPEC.json, or build a spec from flags")
    s.add_argument("spec", nargs="?", help="a JSON job spec (flags below override its fields)")
    s.add_argument("--kind", choices=["train", "distill"])
    s.add_argument("--dataset")
    s.add_argument("--name")
    s.add_argument("--arch", help=f"student architecture {ARCH_HELP} (e.g. gfl_r18, retina_tiny)")
    s.add_argument("--init", metavar="none|imagenet|CKPT_ID", help="the student's initial weights")
    s.add_argument("--teacher-model")
    s.add_argument("--teacher-job")
    s.add_argument("--teacher-checkpoint")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--image-size", type=int, nargs=2, metavar=("LONG", "SHORT"))
    s.add_argument("--seed", type=int)
    s.add_argument("--idempotency-key")
    s.add_argument("--watch", action="store_true", help="then show its progress until it ends")
    for action in ("status", "watch", "cancel"):
        a.add_parser(action).add_argument("id")
    a.add_parser("list").add_argument("--state")
    add_delete(a, "jobs")
    c.set_defaults(func=cmd_jobs)

    c = client("studies", "compare the plain student and distillation methods over seeds, as ordinary jobs")
    a = c.add_subparsers(dest="action", required=True)
    s = a.add_parser("submit", help="submit STUDY.json (the body of POST /v1/studies)")
    s.add_argument("spec")
    s.add_argument("--idempotency-key")
    s.add_argument("--watch", action="store_true", help="then follow it and print its report")
    for action in ("status", "watch", "cancel"):
        a.add_parser(action).add_argument("id")
    r = a.add_parser("report", help="print the report's table (report.md)")
    r.add_argument("id")
    r.add_argument("--chart", metavar="OUT.png", help="also save the report's chart")
    a.add_parser("list")
    add_delete(a, "studies")
    c.set_defaults(func=cmd_studies)

    cli_serving.add_parsers(client, _client, add_delete)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except APIClientError as e:
        print(f"ldd: {e.status} {e.code}: {e.message}", file=sys.stderr)
        if e.status == 401:
            hint = (
                "the key in LDD_API_KEY is not one the server knows"
                if os.environ.get("LDD_API_KEY")
                else "set LDD_API_KEY"
            )
            print(f"ldd: the API wants a key: {hint} (sent as 'Authorization: Bearer <key>')", file=sys.stderr)
        if e.details:
            print(json.dumps(e.details, indent=2)[:4000], file=sys.stderr)
        return 2
    except httpx.TransportError as e:
        print(f"ldd: cannot reach the API ({type(e).__name__}: {e}); is it running? (ldd up)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"ldd: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

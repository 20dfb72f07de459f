"""Compose files for a machine with several GPUs: one worker service per GPU, each really pinned to its GPU.

``docker compose up --scale worker=N`` cannot do that: every replica has the same definition, so the same
device reservation (docker/compose#11863) and the same named volume. This writes one service per GPU instead,
copied from the base file's ``worker``, with its own ``device_ids`` and its own local volume::

    python scripts/compose_gpus.py 4        # docker-compose.gpus.yml: worker-gpu1..worker-gpu3 (GPUs 1..3)
    docker compose -f docker-compose.yml -f docker-compose.gpus.yml up -d --build   # `worker` keeps GPU 0

A second GPU machine runs workers only, against the first machine's Redis, PostgreSQL and MinIO (``LDD_HOST``)::

    python scripts/compose_gpus.py 4 --no-api      # docker-compose.workers.yml: worker, worker-gpu1..3
    LDD_HOST=10.0.0.5 docker compose -f docker-compose.workers.yml up -d --build

That file stands alone (it is not an override of docker-compose.yml): an override cannot take away the base
worker's ``depends_on`` on the local redis, postgres and minio-init, which would start them on that machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "docker-compose.yml"
# Compose stops with this message when LDD_HOST is not set (workers-only file).
LDD_HOST = "${LDD_HOST:?set LDD_HOST to the address of the machine that runs Redis and PostgreSQL and MinIO}"
# The hosts of the base file's URLs (its service names), replaced by LDD_HOST in the workers-only file.
_SERVICE_HOST = re.compile(r"(?P<head>://(?:[^@/]*@)?)(?:postgres|redis|minio)(?=[:/]|$)")


def service_name(gpu: int) -> str:
    return "worker" if gpu == 0 else f"worker-gpu{gpu}"


def pinned_worker(worker: dict[str, Any], gpu: int) -> tuple[dict[str, Any], str]:
    """A copy of the base ``worker`` service on GPU ``gpu`` with its own volume; (service, volume name)."""
    svc = copy.deepcopy(worker)
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if "gpu" in d.get("capabilities", [])]
    if len(gpus) != 1 or len(gpus[0].get("device_ids", [])) != 1:
        raise SystemExit("compose_gpus: the base worker must reserve one GPU by device_ids (it owns several GPUs?)")
    gpus[0].pop("count", None)  # count and device_ids exclude each other
    gpus[0]["device_ids"] = [str(gpu)]
    volume = f"{service_name(gpu)}-data"
    data_dir = svc["environment"]["LDD_DATA_DIR"]
    svc["volumes"] = [f"{volume}:{data_dir}"]
    return svc, volume


def gpu_override(base: dict[str, Any], gpus: int) -> dict[str, Any]:
    """The override for ``docker compose -f docker-compose.yml -f <it>``: worker-gpu1 .. worker-gpu<gpus-1>."""
    services: dict[str, Any] = {}
    volumes: dict[str, None] = {}
    for gpu in range(1, gpus):
        services[service_name(gpu)], volume = pinned_worker(base["services"]["worker"], gpu)
        volumes[volume] = None
    return {"services": services, "volumes": volumes} if volumes else {"services": services}


def workers_only(base: dict[str, Any], gpus: int, context: str) -> dict[str, Any]:
    """A standalone file for a machine that runs workers only: worker, worker-gpu1 .. worker-gpu<gpus-1>, reaching
    Redis, PostgreSQL and MinIO at ``LDD_HOST``; ``context`` is the repository seen from the file's folder."""
    services: dict[str, Any] = {}
    volumes: dict[str, None] = {}
    for gpu in range(gpus):
        svc, volume = pinned_worker(base["services"]["worker"], gpu)
        svc.pop("depends_on", None)  # they run on the other machine
        svc["environment"] = {
            k: _SERVICE_HOST.sub(lambda m: m["head"] + LDD_HOST, v) if isinstance(v, str) else v
            for k, v in svc["environment"].items()
        }
        svc["build"]["context"] = context
        services[service_name(gpu)], volumes[volume] = svc, None
    return {"name": base["name"], "services": services, "volumes": volumes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gpus", type=int, help="GPUs of this machine: one worker each (GPU ids 0 .. N-1)")
    p.add_argument("--no-api", action="store_true",
                   help="a machine that runs workers only (all N of them), against LDD_HOST's Redis, PostgreSQL, "
                        "MinIO: a standalone file, default docker-compose.workers.yml")  # fmt: skip
    p.add_argument(
        "--out", type=Path, help="default: docker-compose.gpus.yml (docker-compose.workers.yml with --no-api)"
    )
    p.add_argument("--base", type=Path, default=BASE, help="the base compose file (default: %(default)s)")
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error("N must be at least 1")
    base = yaml.safe_load(args.base.read_text())
    out: Path = args.out or args.base.parent / (
        "docker-compose.workers.yml" if args.no_api else "docker-compose.gpus.yml"
    )
    if args.no_api:
        context = os.path.relpath(args.base.parent.resolve(), out.parent.resolve())
        doc = workers_only(base, args.gpus, context)
        use = f"LDD_HOST=<first machine> docker compose -f {out.name} up -d --build"
    else:
        doc = gpu_override(base, args.gpus)
        use = f"docker compose -f {args.base.name} -f {out.name} up -d --build"
    header = f"# Written by scripts/compose_gpus.py {' '.join(sys.argv[1:] if argv is None else argv)}; do not edit.\n"
    out.write_text(header + f"#   {use}\n" + yaml.safe_dump(doc, sort_keys=False, width=1000))
    print(f"{out}: {', '.join(doc['services']) or 'no service (one GPU: the base worker)'}\n{use}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

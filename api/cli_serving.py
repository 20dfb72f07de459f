"""``ldd models``, ``ldd deployments`` and ``ldd detect``: what the service serves, and calling it.

    ldd models list | download ID OUT.onnx | delete ID
    ldd deployments create NAME MODEL | update NAME MODEL | rollback NAME | list | show NAME | delete NAME
    ldd detect IMAGE [--model ID | --deployment NAME] [--score-threshold T] [--draw OUT.png]

Part of ``api.cli`` (which builds the parser and handles errors); kept apart so each file reads as one thing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from api.client import Client

ClientFactory = Callable[[argparse.Namespace], Client]


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def add_parsers(
    client: Callable[[str, str], argparse.ArgumentParser],
    clients: ClientFactory,
    add_delete: Callable[[Any, str], None],
) -> None:
    """The three commands on the ``ldd`` parser: ``client(name, help)`` adds one with the connection flags,
    ``clients(args)`` opens a client, ``add_delete(actions, kind)`` adds a ``delete ID`` action."""
    c = client("models", "published models")
    a = c.add_subparsers(dest="action", required=True)
    a.add_parser("list")
    d = a.add_parser("download", help="download a model's ONNX file")
    d.add_argument("id")
    d.add_argument("out")
    add_delete(a, "models")
    c.set_defaults(func=lambda args: cmd_models(clients, args))

    c = client("deployments", "stable names for models: versions, atomic switches, rollback")
    a = c.add_subparsers(dest="action", required=True)
    for action, help in (("create", "name a model (version 1)"),
                         ("update", "serve another model with the same classes and input size")):  # fmt: skip
        s = a.add_parser(action, help=help)
        s.add_argument("name")
        s.add_argument("model")
    a.add_parser("rollback", help="return to the version before the current one").add_argument("name")
    a.add_parser("show", help="the current version and the history").add_argument("name")
    a.add_parser("list")
    add_delete(a, "deployments")
    c.set_defaults(func=lambda args: cmd_deployments(clients, args))

    c = client("detect", "detect objects in an image")
    c.add_argument("image")
    target = c.add_mutually_exclusive_group()
    target.add_argument("--model", help="model id (default: the server's default deployment, else the newest)")
    target.add_argument("--deployment", help="a deployment's name")
    c.add_argument("--score-threshold", type=float)
    c.add_argument("--draw", metavar="OUT.png", help="write the image with its boxes")
    c.set_defaults(func=lambda args: cmd_detect(clients, args))


def cmd_models(clients: ClientFactory, args: argparse.Namespace) -> int:
    with clients(args) as c:
        if args.action == "list":
            for m in c.list_models():
                ap = ((m.get("metrics") or {}).get("bbox") or {}).get("AP")
                ap_s = f"AP {ap:.3f}" if isinstance(ap, int | float) else ""
                print(f"{m['id']}  {m.get('arch') or '?':10s} {ap_s:9s} job {m.get('job_id')}  {m.get('created_at')}")
        else:
            print(c.download_onnx(args.id, args.out))
    return 0


def cmd_deployments(clients: ClientFactory, args: argparse.Namespace) -> int:
    with clients(args) as c:
        if args.action == "list":
            for d in c.list_deployments():
                print(f"{d['name']:24s} v{d['version']:<4d} {d['model_id']}  {d['updated_at']} by {d['updated_by']}")
            return 0
        if args.action == "create":
            dep = c.create_deployment(args.name, args.model)
        elif args.action == "update":
            dep = c.update_deployment(args.name, args.model)
        elif args.action == "rollback":
            dep = c.rollback_deployment(args.name)
        else:
            dep = c.get_deployment(args.name)
        print(f"{dep['name']}: version {dep['version']} serves {dep['model_id']}", file=sys.stderr)
        _print(dep)
    return 0


def cmd_detect(clients: ClientFactory, args: argparse.Namespace) -> int:
    with clients(args) as c:
        res = c.detect(args.image, model=args.model, deployment=args.deployment, score_threshold=args.score_threshold)
    _print(res)
    if args.draw:
        from deploy.draw import draw_detections  # Pillow and numpy: only this command needs them

        draw_detections(args.image, res["detections"]).save(args.draw)
        print(f"wrote {args.draw}", file=sys.stderr)
    return 0

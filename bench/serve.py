"""``/detect`` against the bare ONNX Runtime predictor on the same images, in one run.

    python bench/serve.py [--model-dir DIR] [--arch gfl_tiny] [--size 320 256] [--images 16]
                          [--requests 48] [--clients 1 4 16]

Rows, all on the same PNG images of the benchmark size:
- ``session``: the bare session call (``Predictor.run``) on an already prepared batch of one image;
- ``predict``: ``Predictor.predict([png bytes])``: decoding, preprocessing, the session, mapping back;
- ``predict xN``: ``Predictor.predict`` on N images at once (the batching ceiling: one call for N);
- ``/detect cC``: C concurrent HTTP clients (threads with keep-alive connections) posting the PNG as
  multipart to a real uvicorn server (``uvicorn --factory api.app:create_app``) serving the same model,
  whose micro-batcher merges concurrent requests into one session call.

Latency = per request (median, p90, p99); throughput = requests / wall time. The rows are measured in
``--repeat`` interleaved rounds so that load from other processes falls on all of them alike. The HTTP overhead is
``/detect c1`` minus ``session`` as a share of ``/detect c1`` (DESIGN section 7: under 20% at the
benchmark's image size), computed from each round's medians: its mean over the rounds with a 95% interval from
Student's t (``core.stats``). The target is met only when the whole interval lies under 20%; an interval that
straddles it is "inside noise". A negative share (``/detect`` faster than the session call it contains) is noise
and is reported as such. Without ``--model-dir`` an untrained model is exported whose classification
bias is shifted so that hundreds of candidates pass the score threshold, as with a trained one, so NMS
does real work. The server and the clients share this machine's cores: the numbers include that contention.
Writes ``bench/results/serve.md`` and ``serve.json``.

    python bench/serve.py --backpressure [--bound 8] [--levels 1 4 8 16 32] [--seconds 3] [--repeat 3]

measures ``/detect``'s bounded queue instead (issue 24): two uvicorn servers on loopback serving the same model,
one with ``LDD_DETECT_QUEUE=--bound`` (Q) and one with a bound no load here reaches (100000), each driven in turn
at concurrency 1, 4, Q, 2Q and 4Q by closed-loop clients (a refused client waits its Retry-After), in ``--repeat``
interleaved rounds. Per bound and level: accepted requests/s, p50/p99 of the accepted requests, the share refused
with 503 (and any without Retry-After), other 5xx. The target: the accepted p99 at 4Q with the bound <= 2x the
p99 at Q with the bound, judged on the per-round ratios: "met" only when their whole 95% t interval lies under 2
and no round reached 2, "not met" when the interval lies at or over 2, else "inside noise". Writes
``serve_backpressure.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from report import save

from api.cli import api_command
from core.stats import interval
from deploy.runtime import Predictor, prepare_batch

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarize(name: str, latencies_ms: list[float], wall_s: float, n: int, note: str = "") -> dict[str, Any]:
    return {
        "row": name,
        "requests": n,
        "median_ms": round(statistics.median(latencies_ms), 2),
        "p90_ms": round(percentile(latencies_ms, 90), 2),
        "p99_ms": round(percentile(latencies_ms, 99), 2),
        "throughput_per_s": round(n / wall_s, 1),
        "note": note,
    }


def build_model(work: Path, arch: str, size: tuple[int, int], formats: tuple[str, ...] = ("fp32", "int8")) -> Path:
    """Export an untrained detector (bias shifted to pass ~hundreds of candidates) in fp32 and int8 (calibrated
    on the sample pictures) and publish both (``mdl_bench``, ``mdl_benchint8``; int8 only if in ``formats``)."""
    import torch

    from deploy.export import export_model
    from deploy.registry import Registry
    from distill.checkpoint import atomic_save, build_detector, detector_state

    model = build_detector(arch, 10, classes=[str(i) for i in range(10)])
    with torch.no_grad():
        model.bbox_head.gfl_cls.bias.fill_(-2.5)  # sigmoid ~0.08: just over the 0.05 threshold
    atomic_save(detector_state(model, meta={"input_size": list(size)}), work / "model.pt")
    export_model(work / "model.pt", work / "export", formats=list(formats))
    Registry(work / "data" / "models").publish(work / "export", model_id="mdl_bench")
    if "int8" in formats:
        Registry(work / "data" / "models").publish(work / "export" / "int8", model_id="mdl_benchint8")
    return work / "data" / "models" / "mdl_bench"


def make_images(n: int, size: tuple[int, int], work: Path) -> list[bytes]:
    from distill.data.synthetic import make_synthetic

    folder = make_synthetic(work / "images", num_train=0, num_val=n, image_size=size, seed=0)
    return [p.read_bytes() for p in sorted((folder / "images").glob("*.png"))][:n]


def time_calls(fn: Any, items: list[Any], rounds: int) -> tuple[list[float], float]:
    lat = []
    start = time.perf_counter()
    for r in range(rounds):
        item = items[r % len(items)]
        t = time.perf_counter()
        fn(item)
        lat.append((time.perf_counter() - t) * 1000)
    return lat, time.perf_counter() - start


def http_clients(
    url: str, images: list[bytes], clients: int, requests: int, path: str = "/detect"
) -> tuple[list[float], float, int]:
    """``clients`` threads, each with its own keep-alive connection, ``requests`` in all, posting to ``path``."""
    per = max(1, requests // clients)
    lat: list[float] = []
    lock = threading.Lock()
    detections = [0]
    barrier = threading.Barrier(clients)

    def run(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            c.post(path, files={"file": ("w.png", images[k % len(images)], "image/png")})  # warm connection
            barrier.wait()
            for i in range(per):
                img = images[(k * per + i) % len(images)]
                t = time.perf_counter()
                r = c.post(path, files={"file": ("i.png", img, "image/png")})
                dt = (time.perf_counter() - t) * 1000
                r.raise_for_status()
                with lock:
                    lat.append(dt)
                    detections[0] += len(r.json()["detections"])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - start, detections[0]


def batch_sizes(url: str) -> tuple[float, float]:
    """(sum, count) of the server's ``ldd_detect_batch_size`` histogram."""
    text = httpx.get(url + "/metrics").text
    vals = {}
    for line in text.splitlines():
        for key in ("ldd_detect_batch_size_sum", "ldd_detect_batch_size_count"):
            if line.startswith(key + " "):
                vals[key] = float(line.split()[1])
    return vals.get("ldd_detect_batch_size_sum", 0.0), vals.get("ldd_detect_batch_size_count", 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="a published model folder (model.onnx + model.json)")
    p.add_argument("--arch", default="gfl_tiny")
    p.add_argument("--size", type=int, nargs=2, default=[320, 256], metavar=("W", "H"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--requests", type=int, default=48, help="HTTP requests per concurrency level")
    p.add_argument("--rounds", type=int, default=48, help="calls per bare row")
    p.add_argument("--repeat", type=int, help="interleaved rounds over all rows (>= 3: the interval); default 5, "
                   "3 with --backpressure")  # fmt: skip
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    bp = p.add_argument_group("--backpressure: the bounded detect queue (writes serve_backpressure.md and .json)")
    bp.add_argument("--backpressure", action="store_true", help="measure the bounded queue instead of the rows")
    bp.add_argument("--bound", type=int, default=8, help="LDD_DETECT_QUEUE of the bounded server")
    bp.add_argument("--levels", type=int, nargs="+", help="concurrency levels; default 1 4 Q 2Q 4Q")
    bp.add_argument("--seconds", type=float, default=3.0, help="seconds per level, bound and round")
    bp.add_argument("--ramp", type=float, default=0.3, help="seconds over which a level's clients start")
    args = p.parse_args()
    if args.backpressure:
        backpressure(args)
        return
    args.repeat = args.repeat or 5
    size = (args.size[0], args.size[1])

    with tempfile.TemporaryDirectory(prefix="ldd-bench-serve-") as tmp:
        work = Path(tmp)
        if args.model_dir:
            data = work / "data"
            (data / "models").mkdir(parents=True)
            os.symlink(Path(args.model_dir).absolute(), data / "models" / "mdl_bench")
            model_dir = data / "models" / "mdl_bench"
        else:
            model_dir = build_model(work, args.arch, size)
        images = make_images(args.images, size, work)
        predictor = Predictor(model_dir)
        meta = predictor.meta
        int8_dir = model_dir.parent / "mdl_benchint8"
        int8 = Predictor(int8_dir) if int8_dir.is_dir() else None

        prepared = [prepare_batch(predictor.load([im]), predictor.input_size)[:2] for im in images]
        for im in images[:2]:
            predictor.predict([im])
        batches = sorted({c for c in args.clients if c > 1})
        groups = {n: [[images[(i + k) % len(images)] for k in range(n)] for i in range(len(images))] for n in batches}

        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDD_")}
        env.update({"LDD_DATA_DIR": str(work / "data"), "PYTHONPATH": str(ROOT)})
        with open(work / "api.log", "wb") as log:
            server = subprocess.Popen(api_command("127.0.0.1", port), cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        # Every row gets a share of every round, so load from other processes (this machine is shared)
        # drifts over all rows alike instead of favouring whichever ran first.
        acc: dict[str, dict[str, Any]] = {}
        per_round: dict[str, list[float]] = {}  # each round's median of the rows the overhead compares

        def track(key: str, lat: list[float]) -> None:
            per_round.setdefault(key, []).append(statistics.median(lat))

        def add(name: str, lat: list[float], wall: float, n: int, note: str = "", batch: tuple = (0, 0)) -> None:
            a = acc.setdefault(name, {"lat": [], "wall": 0.0, "n": 0, "note": note, "batch": [0.0, 0.0]})
            a["lat"] += lat
            a["wall"] += wall
            a["n"] += n
            a["batch"][0] += batch[0]
            a["batch"][1] += batch[1]

        try:
            _wait(url)
            _register(work / "data", model_dir, meta)
            if int8 is not None:
                _register(work / "data", int8_dir, int8.meta, "mdl_benchint8", format="int8", fp32_id="mdl_bench")
            calls_per_round = max(1, args.rounds // args.repeat)
            for _ in range(args.repeat):
                lat, wall = time_calls(lambda b: predictor.run(*b), prepared, calls_per_round)
                add("session (bare ORT call, prepared batch of 1)", lat, wall, calls_per_round)
                track("session", lat)
                lat, wall = time_calls(lambda im: predictor.predict([im]), images, calls_per_round)
                add("Predictor.predict (decode + preprocess + session + map back)", lat, wall, calls_per_round)
                for n in batches:
                    calls = max(1, calls_per_round // n)
                    lat, wall = time_calls(lambda g: predictor.predict(g), groups[n], calls)
                    add(f"Predictor.predict x{n} (one call for {n} images)", [x / n for x in lat], wall, calls * n,
                        note="latency per image = call / batch")  # fmt: skip
                for c in args.clients:
                    s0, n0 = batch_sizes(url)
                    lat, wall, _ = http_clients(url, images, c, max(c, args.requests // args.repeat))
                    s1, n1 = batch_sizes(url)
                    add(f"/detect, {c} concurrent client(s)", lat, wall, len(lat), batch=(s1 - s0, n1 - n0))
                    if c == 1:
                        track("detect", lat)
                if int8 is not None:
                    lat, wall = time_calls(lambda b: int8.run(*b), prepared, calls_per_round)
                    add("int8: session (bare ORT call, prepared batch of 1)", lat, wall, calls_per_round)
                    track("int8 session", lat)
                    lat, wall, _ = http_clients(
                        url, images, 1, max(1, args.requests // args.repeat), path="/v1/models/mdl_benchint8/detect"
                    )
                    add("int8: /v1/models/{id}/detect, 1 client", lat, wall, len(lat))
                    track("int8 detect", lat)
        finally:
            server.terminate()
            server.wait(20)
        rows = []
        for name, a in acc.items():
            note = a["note"]
            if a["batch"][1]:
                note = f"mean images per session call {a['batch'][0] / a['batch'][1]:.1f}"
            rows.append(summarize(name, a["lat"], a["wall"], a["n"], note=note))

    session_ms = rows[0]["median_ms"]
    detect1 = next(r for r in rows if r["row"].startswith("/detect, 1 "))
    overhead = (detect1["median_ms"] - session_ms) / detect1["median_ms"]
    thr = {r["row"]: r["throughput_per_s"] for r in rows if r["row"].startswith("/detect")}
    int8_rows = {r["row"].split(": ", 1)[1].split(" ")[0]: r for r in rows if r["row"].startswith("int8: ")}
    int8_overhead = None
    if len(int8_rows) == 2:
        d8 = int8_rows["/v1/models/{id}/detect,"]["median_ms"]
        int8_overhead = round((d8 - int8_rows["session"]["median_ms"]) / d8, 3)

    def share(session: str, detect: str) -> dict[str, Any] | None:
        """The overhead share per round (1 - session / detect, each the round's median) and its t interval."""
        if session not in per_round or detect not in per_round:
            return None
        shares = [1 - a / b for a, b in zip(per_round[session], per_round[detect], strict=True)]
        iv = interval(shares)
        # A negative mean share means the rounds' noise exceeds the overhead itself (/detect contains the session
        # call): the measurement cannot resolve it, whatever the interval's upper end.
        verdict = "inside noise" if (iv.mean or 0.0) < 0 else iv.verdict_below(0.2)
        return {**iv.as_dict(), "rounds": [round(x, 4) for x in shares], "verdict": verdict}

    # The model's name: its model.json's, else the architecture this bench built (an untrained model's meta names
    # none, which earlier runs printed as "None").
    arch = meta.get("arch") or (None if args.model_dir else args.arch) or "unnamed (model.json gives no arch)"
    result = {
        "model": {"arch": arch, "input_size": meta.get("input_size"), "image_size": list(size),
                  "untrained": not args.model_dir},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "providers": predictor.providers},
        "rows": rows,
        "detect_overhead_share": round(overhead, 3),
        "detect_overhead_per_round": share("session", "detect"),
        "int8_detect_overhead_per_round": share("int8 session", "int8 detect"),
        "int8_detect_overhead_share": int8_overhead,
        "int8_session_speedup": round(session_ms / int8_rows["session"]["median_ms"], 2) if int8_rows else None,
        "throughput_detect": thr,
    }  # fmt: skip
    md = render(result)
    print(md)
    print(f"wrote {save('serve', result, md)} and its .json")


def render(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [
        f"# /detect against the bare ONNX Runtime predictor: {m['arch']}, input {m['input_size']}, "
        f"PNG images {m['image_size'][0]}x{m['image_size'][1]}",
        "",
        f"machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}, "
        f"providers {result['machine']['providers']}; server and clients share the cores."
        + (" Untrained model with shifted classification bias (hundreds of NMS candidates)." if m["untrained"] else ""),
        "",
        "| row | requests | median (ms) | p90 (ms) | p99 (ms) | throughput (img/s) | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['requests']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['throughput_per_s']:.1f} | {r['note']} |")  # fmt: skip
    thr = list(result["throughput_detect"].items())
    lines += [
        "",
        "- `/detect` with one client: share of its round trip spent outside the session call (HTTP, multipart, "
        f"decoding, preprocessing, mapping back; target < 20%): {_overhead(result['detect_overhead_per_round'])}.",
        "- throughput by concurrency: " + ", ".join(f"{k.split(', ')[1]}: {v:.1f}/s" for k, v in thr)
        + (" (rises with concurrency)" if all(thr[i][1] < thr[i + 1][1] for i in range(len(thr) - 1))
           else " (does NOT rise monotonically with concurrency)"),
    ]  # fmt: skip
    if result.get("int8_detect_overhead_per_round") is not None:
        lines.append(
            "- int8 model: `/v1/models/{id}/detect` with one client, share outside the int8 session call (target "
            f"< 20%): {_overhead(result['int8_detect_overhead_per_round'])}; the int8 session call is "
            f"{result['int8_session_speedup']:.2f}x as fast as the fp32 one."
        )
    return "\n".join(lines) + "\n"


def _overhead(o: dict[str, Any]) -> str:
    """``12% ± 5% over 5 rounds (95% interval [7%, 17%]): **met**``; a negative mean is named as noise."""
    if o["half_width"] is None:
        return f"{100 * o['mean']:.0f}% in one round: no interval to judge by"
    text = (f"{100 * o['mean']:.0f}% ± {100 * o['half_width']:.0f}% over {o['n']} rounds (95% interval "
            f"[{100 * o['low']:.0f}%, {100 * o['high']:.0f}%]): **{o['verdict']}**")  # fmt: skip
    if o["mean"] < 0:
        text += " (a negative share is impossible: /detect contains the session call; the rounds' noise exceeds it)"
    return text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the API did not start")


def _register(
    data_dir: Path, model_dir: Path, meta: dict[str, Any], model_id: str = "mdl_bench", **precision: Any
) -> None:
    """Record the model in the server's store (as the worker does after publishing); ``precision``: the
    ``format`` and ``fp32_id`` of an int8 or fp16 model."""
    from core.store import Store

    assert model_dir.parent == data_dir / "models", "the server reads models/<id> of its data folder"
    store = Store(f"sqlite:///{data_dir / 'ldd.db'}")
    try:
        store.add_model(model_id, None, f"models/{model_dir.name}", meta, **precision)  # its storage key
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------
# --backpressure: /detect's bounded queue (LDD_DETECT_QUEUE) under concurrency above it


def load_round(url: str, image: bytes, clients: int, seconds: float, ramp_s: float) -> dict[str, Any]:
    """``clients`` closed-loop clients (threads, one keep-alive connection each, opened before the start) posting
    ``image`` to ``/detect`` for ``seconds``; a client told 503 waits its Retry-After, as a well-behaved client
    does (tests/test_backpressure.py's clients). They start over ``ramp_s``, not all in the same millisecond.
    Returns the accepted latencies (ms), the refusals' latencies (ms) and how many of them lacked Retry-After,
    the other statuses, and the wall time."""
    conns = [httpx.Client(base_url=url, timeout=120) for _ in range(clients)]
    for c in conns:
        c.get("/healthz")  # the connection is open before the clock starts (a POST could be refused)
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()
    out: dict[str, Any] = {"ok_ms": [], "refused_ms": [], "no_retry_after": 0, "other": {}}

    def run(k: int) -> None:
        http = conns[k]
        barrier.wait()
        end = time.monotonic() + seconds
        time.sleep(ramp_s * k / clients)
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                r = http.post("/detect", files={"file": ("i.png", image, "image/png")})
                code = r.status_code
            except httpx.TransportError as e:
                code, r = type(e).__name__, None
            dt = (time.perf_counter() - t) * 1000
            with lock:
                if code == 200:
                    out["ok_ms"].append(dt)
                elif code == 503 and r is not None and r.json().get("error", {}).get("code") == "overloaded":
                    out["refused_ms"].append(dt)
                    out["no_retry_after"] += "Retry-After" not in r.headers
                else:
                    out["other"][str(code)] = out["other"].get(str(code), 0) + 1
            if code == 503 and r is not None:
                time.sleep(float(r.headers.get("Retry-After", 1)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    out["wall_s"] = time.perf_counter() - start
    for c in conns:
        c.close()
    return out


def backpressure(args: argparse.Namespace) -> None:
    """Two servers on the same model, one with ``LDD_DETECT_QUEUE=--bound`` and one with a bound no load here
    reaches; every round measures each level on each, interleaved, so the load of other processes falls on all."""
    size = (args.size[0], args.size[1])
    bound, unbounded = args.bound, 100_000
    levels = args.levels or [1, 4, bound, 2 * bound, 4 * bound]
    repeat = args.repeat or 3
    with tempfile.TemporaryDirectory(prefix="ldd-bench-backpressure-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work, args.arch, size, formats=("fp32",))
        meta = Predictor(model_dir).meta
        image = make_images(1, size, work)[0]
        _register(work / "data", model_dir, meta)
        servers, urls = [], {}
        try:
            for q in (bound, unbounded):
                port = _free_port()
                env = {k: v for k, v in os.environ.items() if not k.startswith("LDD_")}
                env.update({"LDD_DATA_DIR": str(work / "data"), "PYTHONPATH": str(ROOT), "LDD_DETECT_QUEUE": str(q)})
                with open(work / f"api{q}.log", "wb") as log:
                    servers.append(subprocess.Popen(api_command("127.0.0.1", port), cwd=ROOT, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT))  # fmt: skip
                urls[q] = f"http://127.0.0.1:{port}"
                _wait(urls[q])
                load_round(urls[q], image, 2, 1.0, 0.0)  # warm: the session opened, the first allocations done
            runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
            for r in range(repeat):
                for c in levels:
                    for q in (bound, unbounded):
                        runs.setdefault((q, c), []).append(load_round(urls[q], image, c, args.seconds, args.ramp))
                print(f"round {r + 1}/{repeat} done", flush=True)
        finally:
            for s in servers:
                s.terminate()
            for s in servers:
                s.wait(20)

    rows = [_bp_row(q, c, runs[q, c], q == unbounded) for q in (bound, unbounded) for c in levels]
    top = max(levels)
    at_bound = [percentile(x["ok_ms"], 99) for x in runs[bound, bound]]
    at_top = [percentile(x["ok_ms"], 99) for x in runs[bound, top]]
    ratios = [a / b for a, b in zip(at_top, at_bound, strict=True)]
    iv = interval(ratios)
    pooled = percentile(_all(runs[bound, top], "ok_ms"), 99) / percentile(_all(runs[bound, bound], "ok_ms"), 99)
    verdict = iv.verdict_below(2.0)  # "met" only when the whole interval lies under 2x
    if verdict == "met" and max(ratios) >= 2.0:
        verdict = "inside noise"  # a round at or over 2x: the spread reaches the target
    result = {
        "model": {"arch": meta.get("arch") or args.arch, "input_size": meta.get("input_size"),
                  "image_size": list(size), "untrained": True},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {"LDD_DETECT_QUEUE": bound, "unbounded_queue": unbounded, "levels": levels, "repeat": repeat,
                     "seconds_per_level": args.seconds, "ramp_s": args.ramp, "clients": "closed loop, threads with "
                     "keep-alive connections; a refused client waits its Retry-After", "path": "/detect"},
        "rows": rows,
        "target": {"what": f"p99 of accepted requests at concurrency {top} with the bound <= 2 x p99 at "
                   f"concurrency {bound} (= the bound) with the bound",
                   "p99_at_bound_ms": [round(x, 1) for x in at_bound],
                   "p99_at_top_ms": [round(x, 1) for x in at_top], "ratio_per_round": [round(x, 3) for x in ratios],
                   "ratio_pooled": round(pooled, 3), "interval": iv.as_dict(), "verdict": verdict},
        "other_5xx": sum(r["other_5xx"] for r in rows),
        "refusals_without_retry_after": sum(r["refused_without_retry_after"] for r in rows),
    }  # fmt: skip
    md = render_backpressure(result)
    print(md)
    print(f"wrote {save('serve_backpressure', result, md)} and its .json")


def _all(parts: list[dict[str, Any]], key: str) -> list[float]:
    return [x for p in parts for x in p[key]]


def _bp_row(q: int, c: int, parts: list[dict[str, Any]], unbounded: bool) -> dict[str, Any]:
    ok, refused = _all(parts, "ok_ms"), _all(parts, "refused_ms")
    other: dict[str, int] = {}
    for p in parts:
        for k, v in p["other"].items():
            other[k] = other.get(k, 0) + v
    sent = len(ok) + len(refused) + sum(other.values())
    p99s = [percentile(p["ok_ms"], 99) for p in parts if p["ok_ms"]]
    thr = [len(p["ok_ms"]) / p["wall_s"] for p in parts]
    return {
        "bound": "none (100000)" if unbounded else q, "concurrency": c, "sent": sent, "accepted": len(ok),
        "accepted_per_s": round(statistics.fmean(thr), 1), "accepted_per_s_rounds": [round(x, 1) for x in thr],
        "p50_ms": round(percentile(ok, 50), 1) if ok else None, "p99_ms": round(percentile(ok, 99), 1) if ok else None,
        "p99_ms_rounds": [round(x, 1) for x in p99s], "refused_503": len(refused),
        "refused_share": round(len(refused) / sent, 3) if sent else 0.0,
        "refused_without_retry_after": sum(p["no_retry_after"] for p in parts),
        "refusal_p50_ms": round(percentile(refused, 50), 1) if refused else None,
        "other_5xx": sum(v for k, v in other.items() if k.isdigit() and 500 <= int(k) < 600),
        "other_statuses": other,
    }  # fmt: skip


def render_backpressure(result: dict[str, Any]) -> str:
    m, s, t = result["model"], result["settings"], result["target"]
    iv = t["interval"]
    lines = [
        f"# /detect's bounded queue under load: {m['arch']}, input {m['input_size']}, PNG "
        f"{m['image_size'][0]}x{m['image_size'][1]}, LDD_DETECT_QUEUE={s['LDD_DETECT_QUEUE']} against unbounded",
        "",
        f"machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}; server and clients share the "
        f"cores. {s['repeat']} interleaved rounds of {s['seconds_per_level']} s per level and bound; {s['clients']}. "
        "Latencies are of accepted (200) requests; throughput = accepted / wall time, mean over the rounds; "
        "p99 spread = min-max of the rounds' p99s.",
        "",
        "| bound | clients | sent | accepted/s | p50 (ms) | p99 (ms) | p99 spread (ms) | 503 share | 503 w/o "
        "Retry-After | 503 p50 (ms) | other 5xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        spread = f"{min(r['p99_ms_rounds']):.0f}-{max(r['p99_ms_rounds']):.0f}" if r["p99_ms_rounds"] else "-"
        lines.append(
            f"| {r['bound']} | {r['concurrency']} | {r['sent']} | {r['accepted_per_s']:.1f} | {r['p50_ms']} | "
            f"{r['p99_ms']} | {spread} | {100 * r['refused_share']:.0f}% | {r['refused_without_retry_after']} | "
            f"{r['refusal_p50_ms'] if r['refusal_p50_ms'] is not None else '-'} | {r['other_5xx']} |"
        )
    ratios = ", ".join(f"{x:.2f}" for x in t["ratio_per_round"])
    band = (f"mean {iv['mean']:.2f}, 95% interval [{iv['low']:.2f}, {iv['high']:.2f}]" if iv["high"] is not None
            else "one round: no interval")  # fmt: skip
    lines += [
        "",
        f"- target: {t['what']}: ratio per round {ratios} ({band}; pooled p99s {t['ratio_pooled']:.2f}): "
        f"**{t['verdict']}**.",
        f"- other 5xx than 503: {result['other_5xx']}; 503s without Retry-After: "
        f"{result['refusals_without_retry_after']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

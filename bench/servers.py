"""Local processes for the benchmarks and the tests: a free port, waiting on a condition, a private
redis-server, and the process tree of a pid read from ``/proc``.

One module for both: ``bench/chaos.py`` imports it as ``servers`` (a bench script has ``bench/`` on its
path) and ``tests/service_fixtures.py`` as ``bench.servers``. Standard library only, so neither side
pulls in the other's dependencies; what is test-only (``pytest.skip`` where redis-server is missing)
stays in the tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """A private redis-server on its own port (a shared one, e.g. on 6379, is left alone). ``stop`` and
    ``start`` again keep the port, so clients reconnect to the same URL; with ``appendonly`` the data
    survives that (the append-only file is kept in ``workdir``), without it the restart loses everything."""

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = False, log: Path | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.log = log  # its output is appended here; discarded without one
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.workdir)]  # fmt: skip
        with open(self.log, "ab") if self.log else open(os.devnull, "wb") as out:
            # Own session: a Ctrl-C in the terminal reaches its owner only (the bench, pytest), which then
            # stops it in order.
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # fmt: skip
        wait_for(self.answers, 20, "redis-server to start")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL, as a crash would: nothing is written on the way out."""
        kill(self.proc)
        self.proc = None


# ------------------------------------------------------------------------------------------ /proc


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, ...); None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process for good."""
    st = _stat(pid)
    return int(st[19]) if st else None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Running and not a zombie (and, with ``started``, the same process, not a reused pid)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and (started is None or int(st[19]) == started)


def family_table(roots: Iterable[int]) -> dict[int, tuple[int, list[str]]]:
    """``{pid: (ppid, argv)}`` of ``roots`` and every live descendant, from /proc's children lists (much
    cheaper than reading every process of a busy machine)."""
    table: dict[int, tuple[int, list[str]]] = {}
    todo = [(r, 0) for r in roots]
    while todo:
        pid, ppid = todo.pop()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()]
        except OSError:
            continue
        if pid_alive(pid):
            table[pid] = (ppid, [a for a in argv if a])
            todo += [(k, pid) for k in kids]
    return table


def descendants(pid: int, table: dict[int, tuple[int, list[str]]] | None = None) -> list[int]:
    """Live processes whose parent chain leads to ``pid`` (from ``table``, else from /proc now)."""
    table = table if table is not None else family_table([pid])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, _) in table.items():
            if ppid == parent:
                out.append(p)
                todo.append(p)
    return out


def terminate(p: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM a child process (if it still runs), give it ``grace`` seconds to exit, then SIGKILL it; reaped."""
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        kill(p)


def kill(p: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a child process (if it still runs) and reap it."""
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait(10)


def kill_pid(pid: int) -> None:
    """SIGKILL a process that is not our child (gone already, or not ours to kill: nothing to do)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- an S3-compatible server (moto's server mode, PyPI ``moto[server]``) ----------------------------------


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables boto3 reads (and a worker or API process is given) to reach ``endpoint``."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def moto_executable() -> str | None:
    """``moto_server`` beside this Python (its virtual environment) or on the PATH."""
    import shutil
    import sys

    return shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's S3 server over HTTP on a free port (the protocol MinIO and AWS speak); yields its endpoint URL.
    ``FileNotFoundError`` when ``moto_server`` is not installed."""
    exe = moto_executable()
    if exe is None:
        raise FileNotFoundError("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        wait_for(up, 30, "moto's S3 server")
        yield url
    finally:
        terminate(proc, 10)


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of ``endpoint`` with the credentials of :func:`s3_env`."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                        region_name="us-east-1")  # fmt: skip


def make_bucket(endpoint: str, name: str) -> str:
    """A new bucket named after ``name`` (lower-cased, other characters as dashes) on ``endpoint``; its name."""
    import re

    bucket = "ldd-" + re.sub(r"[^a-z0-9]+", "-", name.lower())[:40].strip("-")
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket

"""Where every benchmark writes its results: ``bench/results/<name>.json`` (the numbers) and ``.md`` (the
table it printed), each with its provenance. Imported by the scripts beside it (``python bench/<script>.py`` puts
``bench/`` on the path).

Provenance (DESIGN section 7, "Honest figures"): the commit, the date, the machine and the load a result was
measured at. :func:`save` adds it to the JSON as the ``provenance`` key (``commit``, ``date``, ``machine``,
``load``) and to the markdown as a line starting ``Provenance:``, unless the caller already put one there (a
summary re-judged from stored values keeps the provenance of its measurement). A ``.png`` is covered by the
``.json`` of the same name beside it (``tests/test_bench_results.py``). The load is the 1/5/15-minute load
average when this module was imported (the bench's start) and when the result is saved (its end).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
PROVENANCE_KEYS = ("commit", "date", "machine", "load")
_LOAD_AT_START = os.getloadavg()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> str:
    """The CPU model and cores, memory, OS and GPUs (nvidia-smi, when there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        mem = ""
    gpus = ""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10).stdout  # fmt: skip
            gpus = "".join(f", GPU {g.strip()}" for g in out.splitlines() if g.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{cpu}, {os.cpu_count()} CPUs{mem}, {platform.system()} {platform.release()}{gpus}"


def provenance() -> dict[str, Any]:
    """This run's provenance: commit (``+dirty`` with uncommitted changes), UTC date, machine and load."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown (not a git checkout)"
    if commit[0] != "u" and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "commit": commit,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "load": {"start": [round(x, 2) for x in _LOAD_AT_START], "end": [round(x, 2) for x in os.getloadavg()]},
    }


def provenance_line(p: dict[str, Any]) -> str:
    """The markdown line: ``Provenance: commit ..., date ..., machine ..., load ...``."""
    load = p["load"]
    if isinstance(load, dict):
        load = (
            f"1/5/15-min load average {'/'.join(f'{x:g}' for x in load['start'])} at the start, "
            + "/".join(f"{x:g}" for x in load["end"])
            + " at the end"
        )
    line = f"Provenance: commit {p['commit']}, date {p['date']}, machine {p['machine']}, load {load}."
    if p.get("note"):
        line += f" {p['note']}"
    return line


def save(name: str, data: Any, markdown: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (``name`` may contain a sub-folder) with their provenance; the
    ``.md`` path. ``data`` is a dict; its ``provenance`` is filled in unless present."""
    prov = data.setdefault("provenance", provenance())
    line = provenance_line(prov)
    if "\nProvenance: " not in markdown:  # after the title: the first thing a reader checks
        title, _, rest = markdown.partition("\n")
        markdown = f"{title}\n\n{line}\n{rest}"
    md_path = RESULTS / f"{name}.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return md_path


def device_tag(device: str) -> str:
    """``cuda`` or ``cpu``: results from the two kinds of machine are kept apart."""
    return "cuda" if device.startswith("cuda") else "cpu"

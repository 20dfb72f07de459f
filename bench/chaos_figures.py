"""The chaos bench's figures from what it saw, as pure functions (no processes, no network;
tests/test_chaos_bench.py checks them): the workers' child logs, ``progress.jsonl``, the REST view of a job
over time, the attempts' children in a process table, and the report's table cells.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")

_CHILD_HEADER = re.compile(r"^=== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) attempt (\d+): (.+)$")


def parse_child_log(text: str) -> list[tuple[float, int, str]]:
    """``(unix time, attempt, what)`` of each child a worker started, from ``worker_child.log`` headers
    (``=== 2025-01-01 12:00:00 attempt 2: train``; local time, one-second resolution)."""
    out = []
    for line in text.splitlines():
        m = _CHILD_HEADER.match(line.strip())
        if m:
            out.append((time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")), int(m.group(2)), m.group(3)))
    return out


def interleaved_writers(lines: list[dict[str, Any]]) -> list[int]:
    """Indices of ``progress.jsonl`` lines that go back in iterations without saying why.

    One trainer only moves forward; a new attempt's first line goes back to the checkpoint it resumed
    from (``iter == resumed_from_iter``) or to 0 when there was no checkpoint yet. Two trainers writing
    the same file at once interleave, and the older one's next line goes back with no such reason."""
    bad, prev = [], None
    for i, ln in enumerate(lines):
        it = ln.get("iter")
        if it is None:
            continue
        if (
            prev is not None
            and it < prev
            and not (it == ln.get("resumed_from_iter") or (it == 0 and not ln.get("resumed_from_iter")))
        ):
            bad.append(i)
        prev = it
    return bad


def epochs_repeated(lines: list[dict[str, Any]], t_gone: float, per_epoch: int) -> dict[str, Any]:
    """What a kill cost a job, from its ``progress.jsonl`` lines; ``t_gone``: when the killed attempt's
    processes were all gone (lines before it are the killed attempt's, lines after it the next one's).

    ``at_iter``: the last iteration the killed attempt reported (the true one is below the next epoch
    end: each epoch end is checkpointed, then reported). ``resumed_from``: where the next attempt's
    training started (None if it did not train again). ``repeated``: ``at_iter - resumed_from`` in
    epochs, the work trained twice; ``trained_after``: iterations trained after the kill."""
    before = [ln for ln in lines if ln.get("time", 0) < t_gone and ln.get("phase") == "train"]
    after = [ln for ln in lines if ln.get("time", 0) >= t_gone and ln.get("phase") == "train"]
    at_iter = max((ln["iter"] for ln in before), default=0)
    if not after:
        return {"at_iter": at_iter, "resumed_from": None, "repeated": 0.0, "trained_after": 0}
    resumed = after[0].get("resumed_from_iter") or 0
    trained_after = max(ln["iter"] for ln in after) - resumed
    return {
        "at_iter": at_iter,
        "resumed_from": resumed,
        "repeated": round(max(0, at_iter - resumed) / per_epoch, 3),
        "trained_after": trained_after,
    }


def step_seconds(lines: list[dict[str, Any]]) -> float | None:
    """Seconds per training iteration of one attempt, from its ``progress.jsonl`` lines: the span of its
    training records over the iterations between them (checkpoint writes at epoch ends included, as in any
    job). None with fewer than two records of different iterations."""
    train = [ln for ln in lines if ln.get("phase") == "train" and ln.get("iter") is not None and "time" in ln]
    if len(train) < 2 or train[-1]["iter"] <= train[0]["iter"]:
        return None
    return (train[-1]["time"] - train[0]["time"]) / (train[-1]["iter"] - train[0]["iter"])


def job_sig(job: dict[str, Any]) -> tuple[Any, ...]:
    """What of a job, as ``GET /v1/jobs`` shows it, tells that it moved: state, attempt and progress."""
    p = job.get("progress") or {}
    return (job.get("state"), job.get("attempts"), p.get("phase"), p.get("iter"), p.get("time"))


def next_progress(history: list[tuple[float, tuple[Any, ...]]], t: float, min_attempts: int = 0) -> float | None:
    """First time after ``t`` at which a job's REST view (``job_sig`` over time) shows progress written
    after ``t`` (its progress time is later) or its end, by an attempt numbered at least ``min_attempts``."""
    for seen, (state, attempts, _phase, _it, ptime) in history:
        if seen <= t or (attempts or 0) < min_attempts:
            continue
        if (ptime is not None and ptime > t) or state in TERMINAL:
            return seen
    return None


def last_error_line(log: str) -> str | None:
    """The last ``CRITICAL`` or ``ERROR`` record of a worker's log (its traceback lines left out)."""
    found = [ln.strip() for ln in log.splitlines() if re.match(r"^\d{4}-\d\d-\d\d [\d:,]+ (CRITICAL|ERROR) ", ln)]
    return found[-1][:300] if found else None


def first_after(times: Iterable[float], t: float) -> float | None:
    later = [x for x in times if x > t]
    return min(later) if later else None


def seconds(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 1)


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 1 or x == 0 else f"{x:.2f}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def job_children(
    table: dict[int, tuple[int, list[str]]], runs_dirs: Path | Iterable[Path]
) -> dict[int, tuple[str, str, int]]:
    """``{pid: (job id, "train" | "export", ppid)}``: the top-level child processes of attempts, found by
    a run folder (under any of ``runs_dirs``: one per machine) in their command line (a child's own children,
    e.g. DataLoader workers, are skipped)."""
    dirs = [runs_dirs] if isinstance(runs_dirs, Path) else list(runs_dirs)
    pattern = re.compile("(?:" + "|".join(re.escape(str(d)) for d in dirs) + r")/(job_[0-9a-f]+)(/|$)")
    found: dict[int, tuple[str, str, int]] = {}
    for pid, (ppid, argv) in table.items():
        if not argv or "python" not in Path(argv[0]).name:
            continue
        for a in argv[1:]:
            m = pattern.match(a)
            if m:
                what = "train" if "distill" in argv and "train" in argv else "export"
                found[pid] = (m.group(1), what, ppid)
                break
    return {p: v for p, v in found.items() if v[2] not in found}


def stored_models(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(complete, partial)`` model ids from the storage keys under ``models/``: a stored model folder is
    complete once its ``.manifest.json`` (written last) is there; one with files but no manifest is an upload
    cut short (never listed or served)."""
    files: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "models":
            files.setdefault(parts[1], set()).add(parts[2])
    complete = sorted(m for m, names in files.items() if ".manifest.json" in names)
    return complete, sorted(m for m in files if m not in complete)


def reported_before(history: list[tuple[float, tuple[Any, ...]]], t: float) -> int | None:
    """The last training iteration a job's REST view (``job_sig`` over time) showed before ``t``."""
    its = [it for seen, (_s, _a, phase, it, _p) in history if seen < t and phase == "train" and it is not None]
    return its[-1] if its else None

"""The teacher-output cache (DESIGN section 3): with a fixed-scale schedule the frozen teacher's answer for a
training image depends only on the pixels it sees, named by ``(image id, flipped, padded size)``, so it is
computed once and reused in every later epoch.

What is stored. The Main region (ATSS positives) and the VLR come from the preset anchors and the ground-truth
boxes, never from predictions, so they are fixed per key too, and the LD / KD / TBR terms read the teacher
only there. An entry holds those locations' rows in fp16: the class logits of the columns KD reads, then the
``4 x (R + 1)`` edge logits. Terms that read every location (BCKD) make every entry dense (all locations, all
classes). The padded size is part of the key because the batch's padding changes the locations (and the
head's GroupNorm statistics): with one image size, as BCCD or the synthetic sets, it never varies.

On disk (the run folder's ``teacher_cache/``), append-only::

    meta.json     layout and the run's fingerprint (atomic write); another layout or run starts afresh
    rows.f16      entries' rows, (N, width) float16, read through a numpy memmap
    locs.i32      sparse entries' location indices (flat, levels concatenated), int32
    entries.bin   one fixed-size record per finished entry, written last: its key, where its data lies,
                  the data's CRC32 and the record's own CRC32
    lock          flock'ed while an entry is appended: the processes of one DDP job share the cache, and
                  each takes in the others' entries when it misses

A record is the entry's completion marker: a process killed mid-entry leaves data without a record (cut off
on the next open) or a torn record (bad CRC: cut off). The data CRC is checked at each read, so an entry
whose bytes did not reach the disk (power loss) is recomputed, never used. Nothing is lost but time.

Filled lazily: a batch's images that miss go through the teacher (only those: per image its output does
not depend on the rest of the batch), the others are read back. Over a run every (image, flip) costs one
teacher pass, as a pre-pass over both flips would, without a second pass over the data
(``bench/distill_speed.py`` measures both).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.assigners import atss_assign
from distill.criterion import DistillCriterion, HeadOutputs, pad_targets
from distill.files import atomic_write_json
from distill.regions import find_regions
from distill.spec import JobSpec, teacher_cache_blocker, teacher_cache_refusal

VERSION = 1
# image id, flipped, padded h, padded w, first row, rows, first location, data CRC32; then the record's CRC32.
_BODY = struct.Struct("<qBHHQIQI")
_RECORD = _BODY.size + 4
_DATA = ("entries.bin", "rows.f16", "locs.i32")
Key = tuple[int, bool, int, int]


class CacheRefused(ValueError):
    """``teacher_cache: "on"`` for a job whose teacher outputs cannot be reused; the message says why."""


@dataclass(frozen=True)
class Layout:
    """What one row holds and which locations an entry keeps."""

    columns: tuple[int, ...]  # teacher class columns stored (KD's), in this order
    num_classes: int  # the teacher's C_T
    bins: int  # R + 1
    dense: bool  # every location and class (BCKD terms on); else the Main region and/or the VLR
    main: bool  # Main region stored (Main LD / KD, TBR)
    vlr: bool  # VLR stored (VLR LD / KD)
    gamma: float  # the VLR's lower bound (decides its locations)

    @property
    def width(self) -> int:
        return len(self.columns) + 4 * self.bins


def layout_for(criterion: DistillCriterion) -> Layout:
    """The rows the criterion's enabled terms read."""
    spec, w = criterion.spec, criterion.spec.weights.value
    teacher = criterion.teacher
    dense = w("bckd_cls") > 0 or w("bckd_loc") > 0
    kd = criterion.classes.kd_possible and (w("main_kd") > 0 or w("vlr_kd") > 0)
    if dense:
        columns = tuple(range(teacher.num_classes))
    elif kd:
        columns = tuple(range(teacher.num_classes)) if criterion.classes.identity else tuple(criterion.classes.teacher)
    else:
        columns = ()
    return Layout(columns, teacher.num_classes, teacher.reg_max + 1, dense,
                  main=w("main_ld") > 0 or w("main_kd") > 0 or w("tbr") > 0,
                  vlr=w("vlr_ld") > 0 or w("vlr_kd") > 0, gamma=spec.gamma)


class TeacherCache:
    """``criterion.teacher_source``: ``(images (B, 3, H, W), targets) -> HeadOutputs`` from the cache in
    ``folder``, the misses computed live (and stored). Rows it does not hold are ``fill`` (0; the tests use
    NaN to show that no term reads them)."""

    def __init__(self, folder: str | os.PathLike, criterion: DistillCriterion, fingerprint: Any = None,
                 fill: float = 0.0, reason: str = ""):
        self.folder, self.criterion, self.fill, self.reason = Path(folder), criterion, fill, reason
        self.layout = layout_for(criterion)
        self.hits = self.lookups = self.recovered = 0
        self.index: dict[Key, tuple[int, int, int, int]] = {}  # key -> (first row, rows, first loc, data crc)
        self._map: np.memmap | None = None
        self._locs_map: np.memmap | None = None
        self._open({"version": VERSION, "layout": asdict(self.layout), "fingerprint": fingerprint})

    # -- files

    def _path(self, name: str) -> Path:
        return self.folder / name

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive hold of the folder: the processes of one job (DDP ranks) share one cache, and each
        entry is appended whole under the lock. A killed holder's lock is released by the kernel."""
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _open(self, meta: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self._path("lock"), os.O_CREAT | os.O_RDWR)
        meta = _jsonable(meta)
        with self._locked():
            try:
                old = json.loads(self._path("meta.json").read_text())
            except (OSError, ValueError):
                old = None
            if old != meta:  # another layout or run (or none yet): start afresh
                for name in _DATA:
                    self._path(name).unlink(missing_ok=True)
                atomic_write_json(self._path("meta.json"), meta)
            for name in _DATA:
                self._path(name).touch()
            self._read_at = self._rows_end = self._locs_end = 0
            self._sync()
        self.recovered = len(self.index)

    def _sync(self) -> None:
        """Under the lock: take in the records appended since the last call (by any process), then cut what an
        unfinished entry left behind (data without a record, a torn record), so the next entry follows the
        last finished one."""
        with open(self._path("entries.bin"), "rb") as f:
            f.seek(self._read_at)
            raw = f.read()
        rows_size = self._path("rows.f16").stat().st_size // (2 * self.layout.width)
        locs_size = self._path("locs.i32").stat().st_size // 4
        for at in range(0, len(raw) - _RECORD + 1, _RECORD):
            body = raw[at:at + _BODY.size]
            if zlib.crc32(body) != struct.unpack_from("<I", raw, at + _BODY.size)[0]:
                break  # torn record: the entry never finished
            image_id, flipped, h, w, row0, n, loc0, crc = _BODY.unpack(body)
            n_locs = 0 if self.layout.dense else n
            if row0 + n > rows_size or loc0 + n_locs > locs_size:
                break
            self.index[(image_id, bool(flipped), h, w)] = (row0, n, loc0, crc)
            self._rows_end, self._locs_end = max(self._rows_end, row0 + n), max(self._locs_end, loc0 + n_locs)
            self._read_at += _RECORD
        os.truncate(self._path("entries.bin"), self._read_at)
        os.truncate(self._path("rows.f16"), self._rows_end * 2 * self.layout.width)
        os.truncate(self._path("locs.i32"), self._locs_end * 4)

    def _rows(self, row0: int, n: int) -> np.ndarray:
        if n == 0:  # numpy cannot map an empty file
            return np.zeros((0, self.layout.width), np.float16)
        if self._map is None or self._map.shape[0] < row0 + n:
            self._map = np.memmap(self._path("rows.f16"), np.float16, "r", shape=(self._rows_end, self.layout.width))
        return self._map[row0:row0 + n]

    def _locs(self, loc0: int, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros((0,), np.int32)
        if self._locs_map is None or self._locs_map.shape[0] < loc0 + n:
            self._locs_map = np.memmap(self._path("locs.i32"), np.int32, "r", shape=(self._locs_end,))
        return self._locs_map[loc0:loc0 + n]

    def read(self, key: Key) -> tuple[np.ndarray | None, np.ndarray] | None:
        """An entry's ``(locations (K,) or None when dense, rows (K, width) fp16)``, or None (absent or
        its bytes do not match their CRC)."""
        if key not in self.index:
            return None
        row0, n, loc0, crc = self.index[key]
        rows = self._rows(row0, n)
        locs = None if self.layout.dense else self._locs(loc0, n)
        if _crc(rows, locs) != crc:
            del self.index[key]
            return None
        return locs, rows

    def write(self, key: Key, locs: np.ndarray | None, rows: np.ndarray) -> None:
        """Append an entry: data first, its record last (the completion marker)."""
        rows = np.ascontiguousarray(rows, dtype=np.float16)
        locs = None if locs is None else np.ascontiguousarray(locs, dtype=np.int32)
        crc = _crc(rows, locs)
        with self._locked():
            self._sync()  # other processes' entries, and the end of the last finished one
            with open(self._path("rows.f16"), "ab") as f:
                f.write(rows.tobytes())
            if locs is not None:
                with open(self._path("locs.i32"), "ab") as f:
                    f.write(locs.tobytes())
            body = _BODY.pack(key[0], int(key[1]), key[2], key[3], self._rows_end, len(rows), self._locs_end, crc)
            with open(self._path("entries.bin"), "ab") as f:
                f.write(body + struct.pack("<I", zlib.crc32(body)))
            self._sync()

    # -- the criterion's teacher source

    @torch.no_grad()
    def __call__(self, images: Tensor, targets: list[dict]) -> HeadOutputs:
        b, _, h, w = images.shape
        strides = self.criterion.teacher.strides
        sizes = tuple((math.ceil(h / s), math.ceil(w / s)) for s in strides)  # the backbone's ceil halvings
        a = sum(y * x for y, x in sizes)
        lay, dev = self.layout, images.device
        cls = images.new_full((b, a, lay.num_classes), self.fill)
        reg = images.new_full((b, a, 4, lay.bins), self.fill)
        columns = torch.tensor(lay.columns, dtype=torch.long, device=dev)
        keys = [(int(t["image_id"]), bool(t["flipped"]), h, w) for t in targets]
        if any(k not in self.index for k in keys):
            with self._locked():  # another process (DDP rank) may have computed it since
                self._sync()
        miss = []
        for i, key in enumerate(keys):
            got = self.read(key)
            if got is None:
                miss.append(i)
                continue
            locs, rows = got
            row = torch.from_numpy(np.array(rows, dtype=np.float32)).to(dev)
            at = torch.arange(a, device=dev) if locs is None else torch.from_numpy(locs.astype(np.int64)).to(dev)
            cls[i, at[:, None], columns[None]] = row[:, :len(lay.columns)]
            reg[i, at] = row[:, len(lay.columns):].reshape(-1, 4, lay.bins)
        self.lookups += b
        self.hits += b - len(miss)
        if miss:
            live = self.criterion.teacher_forward(images[miss])
            if live.sizes != sizes:
                raise RuntimeError(f"teacher maps {live.sizes} for input {h}x{w}, expected {sizes}")
            cls[miss], reg[miss] = live.cls, live.reg
            self._store([keys[i] for i in miss], [targets[i] for i in miss], live)
        return HeadOutputs(cls, reg, sizes)

    def _store(self, keys: list[Key], targets: list[dict], live: HeadOutputs) -> None:
        lay = self.layout
        rows = torch.cat([live.cls[..., list(lay.columns)], live.reg.flatten(2)], -1)  # (M, A, width)
        if lay.dense:
            for key, r in zip(keys, rows.half().cpu().numpy(), strict=True):
                self.write(key, None, r)
            return
        keep = self.stored_locations(targets, live.sizes, live.cls.device)
        for i, key in enumerate(keys):
            at = keep[i].nonzero().flatten()
            self.write(key, at.cpu().numpy(), rows[i, at].half().cpu().numpy())

    def stored_locations(self, targets: list[dict], sizes: tuple[tuple[int, int], ...],
                         device: torch.device) -> Tensor:
        """``(M, A)`` bool: the locations the enabled terms read, from anchors and boxes only."""
        loc = self.criterion.gfl.locations(sizes, device)
        gt = pad_targets(targets, device)
        assignment = atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid)
        keep = assignment.positive if self.layout.main else torch.zeros_like(assignment.positive)
        if self.layout.vlr:
            keep = keep | find_regions(loc.anchors, gt.boxes, gt.valid, assignment.positive, assignment.threshold,
                                       self.layout.gamma).vlr
        return keep

    # -- reporting

    def bytes(self) -> int:
        return sum(self._path(n).stat().st_size for n in ("meta.json", *_DATA))

    def report(self) -> dict[str, Any]:
        """For the job's metrics: on, why, size on disk, entries, and this attempt's hit rate."""
        return {"enabled": True, "reason": self.reason, "bytes": self.bytes(), "entries": len(self.index),
                "recovered_entries": self.recovered, "hit_rate": round(self.hits / max(self.lookups, 1), 4),
                "lookups": self.lookups, "dense": self.layout.dense, "columns": len(self.layout.columns)}


@dataclass
class CacheOff:
    """The cache is off; ``reason`` says why."""

    reason: str

    def report(self) -> dict[str, Any]:
        return {"enabled": False, "reason": self.reason, "bytes": 0, "entries": 0, "hit_rate": None}


def attach(criterion: DistillCriterion, job: JobSpec, folder: str | os.PathLike, fingerprint: Any = None,
           log: Callable[[str], None] = print) -> TeacherCache | CacheOff:
    """Decide for ``job`` (``distill.teacher_cache`` and :func:`distill.spec.teacher_cache_blocker`), set
    ``criterion.teacher_source`` when on, and log the decision. ``fingerprint``: the run's
    (``distill.train.run_fingerprint``); a cache made for other teacher weights, data or sizes is rebuilt.
    Raises :class:`CacheRefused` for ``"on"`` where the cache cannot apply."""
    assert job.distill is not None
    mode, blocker = job.distill.teacher_cache, teacher_cache_blocker(job)
    if refusal := teacher_cache_refusal(job):
        raise CacheRefused(refusal)
    if mode == "off" or blocker:
        off = CacheOff("off by the job (distill.teacher_cache 'off')" if mode == "off" else blocker or "")
        log(f"teacher cache: off: {off.reason}")
        return off
    sizes = job.schedule.scales or [job.schedule.image_size]
    reason = (f"fixed scale (keep-ratio resize to {sizes[0][0]}x{sizes[0][1]}, random flip): the teacher's "
              "outputs are computed once per (image, flip) and reused")
    cache = TeacherCache(folder, criterion, _outputs_identity(fingerprint), reason=reason)
    criterion.teacher_source = cache
    what = "every location (BCKD)" if cache.layout.dense else " and ".join(
        n for n, on in (("Main region", cache.layout.main), ("VLR", cache.layout.vlr)) if on) or "no location"
    log(f"teacher cache: on: {reason}; stores {what}, {len(cache.layout.columns)} class columns, fp16; "
        f"{cache.recovered} entries reused from a previous attempt")
    return cache


def _outputs_identity(fingerprint: Any) -> Any:
    """What decides the teacher's outputs in a run's fingerprint (``distill.train.run_fingerprint``): its
    weights, the data and the resize; not the schedule's length, lr or process count, so a resumed run
    with another number of GPUs keeps its cache."""
    if not isinstance(fingerprint, dict):
        return fingerprint
    schedule = fingerprint.get("schedule") or {}
    return {"teacher": fingerprint.get("teacher"), "data_sha256": fingerprint.get("data_sha256"),
            "image_size": schedule.get("image_size"), "scales": schedule.get("scales")}


def _crc(rows: np.ndarray, locs: np.ndarray | None) -> int:
    crc = zlib.crc32(np.ascontiguousarray(rows).data)
    return crc if locs is None else zlib.crc32(np.ascontiguousarray(locs).data, crc)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so a stored meta compares equal."""
    return json.loads(json.dumps(obj))

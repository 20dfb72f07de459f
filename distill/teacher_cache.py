"""The teacher-output cache (DESIGN section 3): with a fixed-scale schedule the frozen teacher's answer for a
training image is defined per image, independent of the rest of the batch: the teacher runs on the image
padded to its own multiple of 32 (its *own canvas*), and its rows map onto the batch's grid (the same
locations: both grids start at the image's corner, at the same strides). So the answer is named by ``(image
id, flipped)`` alone (the own canvas follows from the image), computed once, and reused in every later epoch,
however the images are batched; on mixed-size photos too, where the batch's canvas changes with every shuffle.
The batch's locations beyond an image's own canvas are padding, which no term reads (the padding mask).

What is stored. The Main region (the student family's positives) and the VLR come from the preset anchors and
the ground-truth boxes, never from predictions, so they are fixed per key too, and the LD / KD / TBR terms
read the teacher only there. An entry holds those locations' ``4 x (R + 1)`` edge logits in fp16, and the
class logits of the columns KD reads only where KD reads them (by default the Main region: the VLR, most of
the rows, is LD's alone). Terms that read every location (BCKD) make every entry dense (all locations of the
own canvas, all classes). Locations are indexed on the own canvas. With one image size, as BCCD or the
synthetic sets, the own canvas is the batch's, and the answer is exactly the batched teacher's.

On disk (the run folder's ``teacher_cache/``), append-only::

    meta.json     layout and the run's fingerprint (atomic write); another layout or run starts afresh
    reg.f16       edge logits, (N, 4 (R + 1)) float16, one row per stored location, read through a memmap
    cls.f16       class logits, (M, C_k) float16, for an entry's first locations (those KD reads)
    locs.i32      sparse entries' location indices (flat, levels concatenated), int32
    entries.bin   one fixed-size record per finished entry, written last: its key, where its data lies,
                  the data's CRC32 and the record's own CRC32
    lock          flock'ed while an entry is appended: the processes of one DDP job share the cache, and
                  each takes in the others' entries when it misses

A record is the entry's completion marker: a process killed mid-entry leaves data without a record (cut off
on the next open) or a torn record (bad CRC: cut off). The data CRC is checked at each read, so an entry
whose bytes did not reach the disk (power loss) is recomputed, never used. Nothing is lost but time.

Filled lazily: a batch's images that miss go through the teacher on their own canvases (those of one size
together), the others are read back; with the cache on, a miss is answered the same way, so the first epoch
and the later ones see the same definition. Over a run every (image, flip) costs one
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

from distill.criterion import DistillCriterion
from distill.files import NoRoom, atomic_write_json, ensure_room
from distill.outputs import HeadOutputs, pad_targets, valid_locations
from distill.regions import find_regions
from distill.spec import JobSpec, teacher_cache_blocker, teacher_cache_refusal

VERSION = 3  # 3: entries keyed by (image, flip) on the image's own canvas (2: the batch's canvas)
# image id, flipped, own canvas h, own canvas w, first reg row, reg rows, first cls row, cls rows, first location,
# data CRC32; then the record's own CRC32.
_BODY = struct.Struct("<qBHHQIQIQI")
_RECORD = _BODY.size + 4
_DATA = ("entries.bin", "reg.f16", "cls.f16", "locs.i32")
Key = tuple[int, bool, int, int]


class CacheRefused(ValueError):
    """``teacher_cache: "on"`` for a job whose teacher outputs cannot be reused; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Which locations an entry keeps, and what it holds for them."""

    columns: tuple[int, ...]  # teacher class columns stored (KD's), in this order
    num_classes: int  # the teacher's C_T
    bins: int  # R + 1
    dense: bool  # every location, edges and every class (BCKD terms on); else the regions below
    reg_main: bool  # edge logits of the Main region (Main LD, TBR)
    reg_vlr: bool  # edge logits of the VLR (VLR LD)
    cls_main: bool  # class logits of the Main region (Main KD)
    cls_vlr: bool  # class logits of the VLR (VLR KD)
    gamma: float  # the VLR's lower bound (decides its locations)


def layout_for(criterion: DistillCriterion) -> Layout:
    """What the criterion's enabled terms read."""
    spec, w = criterion.spec, criterion.spec.weights.value
    teacher, kd = criterion.teacher, criterion.classes.kd_possible
    dense = w("bckd_cls") > 0 or w("bckd_loc") > 0
    cls_main, cls_vlr = kd and w("main_kd") > 0, kd and w("vlr_kd") > 0
    if dense or criterion.classes.identity:
        columns = tuple(range(teacher.num_classes)) if dense or cls_main or cls_vlr else ()
    else:
        columns = tuple(criterion.classes.teacher) if cls_main or cls_vlr else ()
    return Layout(
        columns,
        teacher.num_classes,
        teacher.reg_max + 1,
        dense,
        reg_main=w("main_ld") > 0 or w("tbr") > 0,
        reg_vlr=w("vlr_ld") > 0,
        cls_main=cls_main,
        cls_vlr=cls_vlr,
        gamma=spec.gamma,
    )


class _Rows:
    """An append-only file of ``(N, width)`` rows of one dtype, read through a numpy memmap."""

    def __init__(self, path: Path, dtype: type, width: int):
        self.path, self.dtype, self.width = path, np.dtype(dtype), width
        self.end = 0  # rows that finished entries own
        self._map: np.memmap | None = None

    def on_disk(self) -> int:
        return self.path.stat().st_size // max(self.dtype.itemsize * self.width, 1)

    def read(self, start: int, n: int) -> np.ndarray:
        if n == 0 or self.width == 0:  # numpy cannot map an empty file
            return np.zeros((n, self.width), self.dtype)
        if self._map is None or self._map.shape[0] < start + n:
            self._map = np.memmap(self.path, self.dtype, "r", shape=(self.end, self.width))
        return self._map[start : start + n]

    def append(self, rows: np.ndarray) -> None:
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(rows, self.dtype).tobytes())

    def cut(self) -> None:
        """Drop what follows the finished entries' rows."""
        os.truncate(self.path, self.end * self.dtype.itemsize * self.width)


class TeacherCache:
    """``criterion.teacher_source``: ``(images (B, 3, H, W), targets) -> HeadOutputs`` from the cache in
    ``folder``, the misses computed live (and stored). Rows it does not hold are ``fill`` (0; the tests use
    NaN to show that no term reads them)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        criterion: DistillCriterion,
        fingerprint: Any = None,
        fill: float = 0.0,
        reason: str = "",
        min_free_bytes: int = 0,
    ):
        self.folder, self.criterion, self.fill, self.reason = Path(folder), criterion, fill, reason
        # The cache never takes the room a checkpoint needs: short of it, it stops growing (misses stay live).
        self.min_free_bytes = min_free_bytes
        self.full: str | None = None  # why it stopped growing
        self.layout = lay = layout_for(criterion)
        self.hits = self.lookups = self.recovered = self.teacher_passes = 0
        self.images_seen: set[tuple[int, bool]] = set()
        self._remaps: dict[tuple, Tensor] = {}
        # key -> (first reg row, reg rows, first cls row, cls rows, first location, data CRC)
        self.index: dict[Key, tuple[int, int, int, int, int, int]] = {}
        self._reg = _Rows(self.folder / "reg.f16", np.float16, 4 * lay.bins)
        self._cls = _Rows(self.folder / "cls.f16", np.float16, len(lay.columns))
        self._locs = _Rows(self.folder / "locs.i32", np.int32, 0 if lay.dense else 1)
        self._open({"version": VERSION, "layout": asdict(lay), "fingerprint": fingerprint})

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
            self._read_at = 0
            self._sync()
        self.recovered = len(self.index)

    def _sync(self) -> None:
        """Under the lock: take in the records appended since the last call (by any process), then cut what an
        unfinished entry left behind (data without a record, a torn record), so the next entry follows the
        last finished one."""
        with open(self._path("entries.bin"), "rb") as f:
            f.seek(self._read_at)
            raw = f.read()
        reg_size, cls_size, locs_size = self._reg.on_disk(), self._cls.on_disk(), self._locs.on_disk()
        for at in range(0, len(raw) - _RECORD + 1, _RECORD):
            body = raw[at : at + _BODY.size]
            if zlib.crc32(body) != struct.unpack_from("<I", raw, at + _BODY.size)[0]:
                break  # torn record: the entry never finished
            image_id, flipped, h, w, reg0, n, cls0, m, loc0, crc = _BODY.unpack(body)
            n_locs = 0 if self.layout.dense else n
            m_cls = m if self._cls.width else 0
            if reg0 + n > reg_size or cls0 + m_cls > cls_size or loc0 + n_locs > locs_size:
                break
            self.index[(image_id, bool(flipped), h, w)] = (reg0, n, cls0, m, loc0, crc)
            self._reg.end = max(self._reg.end, reg0 + n)
            self._cls.end = max(self._cls.end, cls0 + m_cls)
            self._locs.end = max(self._locs.end, loc0 + n_locs)
            self._read_at += _RECORD
        os.truncate(self._path("entries.bin"), self._read_at)
        for rows in (self._reg, self._cls, self._locs):
            rows.cut()

    def read(self, key: Key) -> tuple[np.ndarray | None, np.ndarray, np.ndarray] | None:
        """An entry's ``(locations (K,) int32 or None when dense, edge rows (K, 4 (R + 1)), class rows
        (K_c, C_k))`` in fp16, the class rows belonging to the first ``K_c`` locations; None when absent or
        when its bytes do not match their CRC."""
        if key not in self.index:
            return None
        reg0, n, cls0, m, loc0, crc = self.index[key]
        locs = None if self.layout.dense else self._locs.read(loc0, n)[:, 0]
        reg, cls = self._reg.read(reg0, n), self._cls.read(cls0, m)
        if _crc(reg, cls, locs) != crc:
            del self.index[key]
            return None
        return locs, reg, cls

    def write(self, key: Key, locs: np.ndarray | None, reg: np.ndarray, cls: np.ndarray) -> None:
        """Append an entry: data first, its record last (the completion marker)."""
        reg, cls = np.ascontiguousarray(reg, np.float16), np.ascontiguousarray(cls, np.float16)
        locs = None if locs is None else np.ascontiguousarray(locs, np.int32)
        crc = _crc(reg, cls, locs)
        try:
            ensure_room(
                self.folder,
                self.min_free_bytes,
                "the teacher cache",
                reg.nbytes + cls.nbytes + (0 if locs is None else locs.nbytes) + _RECORD,
            )
        except NoRoom as e:
            self.full = str(e)
            return
        with self._locked():
            self._sync()  # other processes' entries, and the end of the last finished one
            self._reg.append(reg)
            if self._cls.width:
                self._cls.append(cls)
            if locs is not None:
                self._locs.append(locs)
            body = _BODY.pack(
                key[0],
                int(key[1]),
                key[2],
                key[3],
                self._reg.end,
                len(reg),
                self._cls.end,
                len(cls),
                self._locs.end,
                crc,
            )
            with open(self._path("entries.bin"), "ab") as f:
                f.write(body + struct.pack("<I", zlib.crc32(body)))
            self._sync()

    # -- the criterion's teacher source

    @torch.no_grad()
    def __call__(self, images: Tensor, targets: list[dict]) -> HeadOutputs:
        """The teacher's outputs for a batch ``images (B, 3, H, W)`` in the student's rows, each image's from the
        cache or from the teacher on its own canvas; rows beyond an image's own canvas hold ``fill``."""
        b, _, h, w = images.shape
        sizes = _level_sizes(h, w, self.criterion.teacher.strides)
        # Rows in the student's layout (its anchors per location): the cache holds the teacher's outputs as the
        # terms read them (``DistillCriterion.to_student``: matched anchors, quality folded into the scores).
        anchors = self.criterion.student_anchors
        a = sum(y * x for y, x in sizes) * anchors
        lay, dev = self.layout, images.device
        cls = images.new_full((b, a, lay.num_classes), self.fill)
        reg = images.new_full((b, a, 4, lay.bins), self.fill)
        columns = torch.tensor(lay.columns, dtype=torch.long, device=dev)
        keys = [_key(t, h, w) for t in targets]
        if any(k not in self.index for k in keys):
            with self._locked():  # another process (DDP rank) may have computed it since
                self._sync()
        miss = []
        for i, key in enumerate(keys):
            got = self.read(key)
            if got is None:
                miss.append(i)
                continue
            locs, reg_rows, cls_rows = got
            remap = self._remap(key[2:], (h, w), anchors, dev)
            at = remap if locs is None else remap[torch.from_numpy(locs.astype(np.int64)).to(dev)]
            reg[i, at] = torch.from_numpy(reg_rows.astype(np.float32)).to(dev).reshape(-1, 4, lay.bins)
            if len(columns):
                cls[i, at[: len(cls_rows), None], columns[None]] = torch.from_numpy(cls_rows.astype(np.float32)).to(dev)
        self.lookups += b
        self.hits += b - len(miss)
        self.images_seen.update(k[:2] for k in keys)
        by_canvas: dict[tuple[int, int], list[int]] = {}
        for i in miss:
            by_canvas.setdefault(keys[i][2:], []).append(i)
        for (oh, ow), group in by_canvas.items():
            live = self.criterion.to_student(self.criterion.teacher_forward(images[group, :, :oh, :ow]))
            self.teacher_passes += len(group)
            if live.sizes != _level_sizes(oh, ow, self.criterion.teacher.strides):
                raise RuntimeError(f"teacher maps {live.sizes} for input {oh}x{ow}")
            at = self._remap((oh, ow), (h, w), anchors, dev)
            for j, i in enumerate(group):
                cls[i, at], reg[i, at] = live.cls[j], live.reg[j]
            if self.full is None:
                self._store([keys[i] for i in group], [targets[i] for i in group], live)
        return HeadOutputs(cls, reg, sizes)

    def _remap(self, own: tuple[int, int], batch: tuple[int, int], anchors: int, device: torch.device) -> Tensor:
        """``(L_own * A,)`` long: each row of the own canvas (levels concatenated, anchor-minor) as its row on
        the batch's canvas. The own canvas is the batch's top-left corner, so location (y, x) of a level keeps
        its (y, x)."""
        key = (own, batch, anchors, str(device))
        if key not in self._remaps:
            strides = self.criterion.teacher.strides
            parts, offset = [], 0
            for (oh, ow), (bh, bw) in zip(_level_sizes(*own, strides), _level_sizes(*batch, strides), strict=True):
                ys, xs = torch.meshgrid(torch.arange(oh), torch.arange(ow), indexing="ij")
                cell = (ys * bw + xs).reshape(-1, 1) * anchors + torch.arange(anchors)  # (oh * ow, A)
                parts.append(offset + cell.reshape(-1))
                offset += bh * bw * anchors
            self._remaps[key] = torch.cat(parts).to(device)
        return self._remaps[key]

    def _store(self, keys: list[Key], targets: list[dict], live: HeadOutputs) -> None:
        """Append the entries of images computed together on one own canvas (``live``'s rows are on it)."""
        lay = self.layout
        reg = live.reg.flatten(2).half()  # (M, A, 4 (R + 1))
        cls = live.cls[..., list(lay.columns)].half()  # (M, A, C_k)
        if lay.dense:
            for i, key in enumerate(keys):
                self.write(key, None, reg[i].cpu().numpy(), cls[i].cpu().numpy())
            return
        with_cls, without_cls = self.stored_locations(targets, live.sizes, live.cls.device)
        for i, key in enumerate(keys):
            first, rest = with_cls[i].nonzero().flatten(), without_cls[i].nonzero().flatten()
            at = torch.cat([first, rest])  # the locations with class rows first
            self.write(key, at.cpu().numpy(), reg[i, at].cpu().numpy(), cls[i, first].cpu().numpy())

    def stored_locations(
        self, targets: list[dict], sizes: tuple[tuple[int, int], ...], device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The locations the enabled terms read, from anchors and boxes only: ``(M, A)`` bool masks of those
        whose class logits are read too (KD) and of the others (edges only)."""
        lay = self.layout
        loc = self.criterion.task.locations(sizes, device)
        gt = pad_targets(targets, device)
        # The student family's Main region and the VLR as the criterion finds them: inside the images only.
        valid = valid_locations(loc.points, gt, len(targets))
        assignment = self.criterion.task.assign(loc, gt, valid)
        main = assignment.positive & valid
        vlr = torch.zeros_like(main)
        if lay.reg_vlr or lay.cls_vlr:
            vlr = find_regions(loc.anchors, gt.boxes, gt.valid, main, assignment.threshold, lay.gamma).vlr & valid
        with_cls = (main & lay.cls_main) | (vlr & lay.cls_vlr)
        read = (main & (lay.reg_main or lay.cls_main)) | (vlr & (lay.reg_vlr or lay.cls_vlr))
        return with_cls, read & ~with_cls

    # -- reporting

    def bytes(self) -> int:
        return sum(self._path(n).stat().st_size for n in ("meta.json", *_DATA))

    def report(self) -> dict[str, Any]:
        """For the job's metrics: on, why, size on disk, entries, and this attempt's hit rate."""
        return {
            "enabled": True,
            "reason": self.reason,
            "bytes": self.bytes(),
            "entries": len(self.index),
            "recovered_entries": self.recovered,
            "hit_rate": round(self.hits / max(self.lookups, 1), 4),
            "lookups": self.lookups,
            # This attempt's: images through the teacher, against the distinct (image, flip) pairs it met.
            "teacher_passes": self.teacher_passes,
            "images": len(self.images_seen),
            "dense": self.layout.dense,
            "columns": len(self.layout.columns),
            "full": self.full,
        }


@dataclass
class CacheOff:
    """The cache is off; ``reason`` says why."""

    reason: str

    def report(self) -> dict[str, Any]:
        return {"enabled": False, "reason": self.reason, "bytes": 0, "entries": 0, "hit_rate": None}


def attach(
    criterion: DistillCriterion,
    job: JobSpec,
    folder: str | os.PathLike,
    fingerprint: Any = None,
    log: Callable[[str], None] = print,
    min_free_bytes: int = 0,
) -> TeacherCache | CacheOff:
    """Decide for ``job`` (``distill.teacher_cache`` and :func:`distill.spec.teacher_cache_blocker`), set
    ``criterion.teacher_source`` when on, and log the decision. ``fingerprint``: the run's
    (``distill.run_state.run_fingerprint``); a cache made for other teacher weights, data or sizes is rebuilt.
    ``min_free_bytes``: the room the cache leaves free (the run's checkpoints need it).
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
    reason = (
        f"fixed scale (keep-ratio resize to {sizes[0][0]}x{sizes[0][1]}, random flip): the teacher's "
        "outputs are computed once per (image, flip) and reused"
    )
    cache = TeacherCache(
        folder, criterion, _outputs_identity(fingerprint), reason=reason, min_free_bytes=min_free_bytes
    )
    criterion.teacher_source = cache
    lay = cache.layout
    what = (
        "every location (BCKD)"
        if lay.dense
        else " and ".join(
            n for n, on in (("Main region", lay.reg_main or lay.cls_main), ("VLR", lay.reg_vlr or lay.cls_vlr)) if on
        )
    )
    log(
        f"teacher cache: on: {reason}; stores {what or 'no location'}, {len(lay.columns)} class columns, fp16; "
        f"{cache.recovered} entries reused from a previous attempt"
    )
    return cache


def _level_sizes(h: int, w: int, strides: tuple[int, ...] | list[int]) -> tuple[tuple[int, int], ...]:
    """Each FPN level's ``(H_l, W_l)`` for an input ``h x w`` (the backbone's ceil halvings)."""
    return tuple((math.ceil(h / s), math.ceil(w / s)) for s in strides)


def _key(target: dict, h: int, w: int) -> Key:
    """An image's cache key: its id, whether it is flipped, and its own canvas (its resized size rounded up to
    32, within the batch's ``h x w``), which follows from the image alone."""
    ih, iw = target.get("size", (h, w))
    own_h, own_w = min(h, -(-int(ih) // 32) * 32), min(w, -(-int(iw) // 32) * 32)
    return int(target["image_id"]), bool(target["flipped"]), own_h, own_w


def _outputs_identity(fingerprint: Any) -> Any:
    """What decides the teacher's outputs in a run's fingerprint (``distill.run_state.run_fingerprint``): its
    weights, the data and the resize; not the schedule's length, lr or process count, so a resumed run
    with another number of GPUs keeps its cache."""
    if not isinstance(fingerprint, dict):
        return fingerprint
    schedule = fingerprint.get("schedule") or {}
    return {
        "teacher": fingerprint.get("teacher"),
        "data_sha256": fingerprint.get("data_sha256"),
        "image_size": schedule.get("image_size"),
        "scales": schedule.get("scales"),
    }


def _crc(reg: np.ndarray, cls: np.ndarray, locs: np.ndarray | None) -> int:
    crc = zlib.crc32(np.ascontiguousarray(cls).data, zlib.crc32(np.ascontiguousarray(reg).data))
    return crc if locs is None else zlib.crc32(np.ascontiguousarray(locs).data, crc)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), so a stored meta compares equal."""
    return json.loads(json.dumps(obj))

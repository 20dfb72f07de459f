"""Cost of a distillation step against a student step plus a teacher forward pass, with and without the
teacher cache; the share of the step spent finding the regions (Main + VLR); and the cache's size.

    python bench/distill_speed.py [--student gfl_r18] [--teacher gfl_r101] [--size 512 320] [--batch 2]
                                  [--iters 10] [--warmup 5] [--device cpu] [--threads N] [--no-sizes]
                                  [--data synthetic|raccoon]

``--data raccoon``: raccoon's photos of mixed sizes (its training split), so the batches' canvases change and
the cache answers per image on its own canvas (``distill.teacher_cache``); results ``distill_speed_<device>_raccoon``.

Steps are the training loop's own (``Trainer.step`` + backward + optimiser step) on the same batches:

- student: a ``kind: train`` step; teacher: the teacher's forward pass as the loop runs it;
- LD live: the distillation step with the teacher's live pass (``criterion.teacher_source = None``);
- LD filling: the step of the epoch that fills the cache (every image misses: teacher pass + rows stored);
- LD cached: the same batch again, answered from the cache (what every later epoch costs);
- pre-pass: what filling by a separate pass would cost per batch (load the batch, teacher pass, store).

They are timed in turn on each batch, so load from other processes hits them alike; medians are reported.
Targets (DESIGN section 7): ``LD live / (student + teacher) <= 1.10``, ``LD cached / student <= 1.10``,
regions < 5% of the step.

Cache size (``--no-sizes`` skips it): bytes on disk with the default terms (Main LD + VLR LD + Main KD), both
flips of every image, measured by filling a real cache (a small teacher: the bytes depend on the classes and
the regions, not on the teacher's depth) for the BCCD training split at 640x480 (3 classes) and for synthetic
1333x800 images with COCO's 7.3 boxes per image and 80 classes, scaled on paper to COCO train2017's 118287
images. Prints tables and writes ``bench/results/distill_speed_<device>.json|md``.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import device_tag, save

from distill.checkpoint import atomic_save, build_detector, detector_state
from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.data.annotations import load_coco, split
from distill.data.dataset import DetectionDataset, collate
from distill.data.synthetic import make_synthetic
from distill.data.voc import import_voc
from distill.outputs import pad_targets
from distill.spec import DistillSpec, GFLWeights, LocalJobSpec
from distill.task_criteria import GFLCriterion
from distill.teacher_cache import TeacherCache
from distill.train import Trainer

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd-voc"
COCO_TRAIN_IMAGES = 118287
COCO_BOXES_PER_IMAGE = 7.3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of ``fn()``. On a shared CPU the second is the
    steadier measure of cost: time spent waiting for a core counts in the first only."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _train_step(trainer: Trainer, images: torch.Tensor, targets: list[dict]) -> None:
    step = trainer.step(images, targets)
    trainer.optimizer.zero_grad(set_to_none=True)
    step.total.backward()
    trainer.optimizer.step()


def measure(
    student: str,
    teacher: str,
    size: tuple[int, int],
    batch: int,
    iters: int,
    warmup: int,
    device: str,
    data: str = "synthetic",
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if data == "raccoon":  # real photos of mixed sizes: batches on changing canvases, per-image cache keys
            from ablation_plan import Plan, prepare_data

            data_dir = prepare_data(Plan(dataset="raccoon"), tmp_path)
            classes = load_coco(data_dir, check_images=False).classes
        else:
            data_dir = make_synthetic(
                tmp_path / "data", num_train=batch * (iters + warmup), num_val=2, image_size=size, seed=0
            )
            classes = [str(d) for d in range(10)]
        teacher_path = tmp_path / "teacher.pt"
        atomic_save(detector_state(build_detector(teacher, len(classes), classes)), teacher_path)
        schedule = {"epochs": 1, "batch_size": batch, "image_size": list(size), "num_workers": 0, "warmup_iters": 0}
        base = {"dataset": str(data_dir), "student": {"arch": student}, "schedule": schedule}
        plain = Trainer(LocalJobSpec.model_validate({"kind": "train", **base}), tmp_path / "plain", device=device)
        spec = LocalJobSpec.model_validate({"kind": "distill", **base, "teacher": {"path": str(teacher_path)}})
        distilled = Trainer(spec, tmp_path / "distill", device=device)
        dev = distilled.device
        criterion = distilled.criterion
        assert isinstance(criterion, DistillCriterion) and isinstance(distilled.teacher_cache, TeacherCache)
        cache = distilled.teacher_cache  # filled by the "filling" step of each batch, read by the "cached" one
        prepass = TeacherCache(tmp_path / "prepass", criterion)
        plain.model.train()
        distilled.model.train()

        def distill_step(source, images: torch.Tensor, targets: list[dict]) -> None:
            criterion.teacher_source = source
            _train_step(distilled, images, targets)

        def regions(images: torch.Tensor, targets: list[dict]) -> tuple[float, int, int]:
            with torch.no_grad():
                gt = pad_targets(targets, dev)
                _, state = criterion.task.losses(criterion.task.forward(images), gt)
                found = []
                elapsed = _timed(lambda: found.append(criterion.regions(state, gt)), dev)[0]
                return elapsed, int(found[0].main.sum()), int(found[0].vlr.sum())

        times: dict[str, list[float]] = {
            k: [] for k in ("student", "teacher", "live", "filling", "cached", "prepass", "load", "regions")
        }
        cpu_times: dict[str, list[float]] = {
            k: [] for k in ("student", "teacher", "live", "filling", "cached", "prepass")
        }
        sizes = {"main": [], "vlr": []}
        batches = iter(distilled.train_loader)
        for i in range(warmup + iters):
            load_start = time.perf_counter()
            images, targets = next(batches)
            load = time.perf_counter() - load_start
            images = images.to(dev)
            # Batches of one epoch never repeat an image: "filling" misses every image, "cached" hits every one.
            steps = {
                "student": lambda: _train_step(plain, images, targets),  # noqa: B023
                "teacher": lambda: criterion.teacher_forward(images),  # noqa: B023
                "live": lambda: distill_step(None, images, targets),  # noqa: B023
                "filling": lambda: distill_step(cache, images, targets),  # noqa: B023
                "cached": lambda: distill_step(cache, images, targets),  # noqa: B023
                "prepass": lambda: prepass(images, targets),  # noqa: B023
            }
            sample, cpu_sample = {}, {}
            for name, fn in steps.items():
                sample[name], cpu_sample[name] = _timed(fn, dev)
            sample["prepass"] += load
            sample["load"] = load
            sample["regions"], n_main, n_vlr = regions(images, targets)
            print(
                f"batch {i + 1}/{warmup + iters}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in sample.items()),
                file=sys.stderr,
                flush=True,
            )
            if i >= warmup:
                for k, v in sample.items():
                    times[k].append(v)
                for k, v in cpu_sample.items():
                    cpu_times[k].append(v)
                sizes["main"].append(n_main)
                sizes["vlr"].append(n_vlr)
        assert cache.hits == cache.lookups / 2, "each batch must miss once (filling), then hit (cached)"
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}

        def paired(a: str, b: str, t: dict[str, list[float]] = times) -> float:
            """Median over batches of ``a / b`` on the same batch, timed seconds apart (shared load cancels)."""
            return statistics.median(x / y for x, y in zip(t[a], t[b], strict=True))

        return {
            "student": student,
            "teacher": teacher,
            "image_size": list(size),
            "data": data,
            "batch": batch,
            "iters": iters,
            "warmup": warmup,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "amp": distilled.amp,
            "median_ms": {k: 1000 * v for k, v in med.items()},
            "min_ms": {k: 1000 * v for k, v in low.items()},
            "samples_ms": {k: [round(1000 * x, 1) for x in v] for k, v in times.items()},
            "cpu_median_ms": {k: 1000 * statistics.median(v) for k, v in cpu_times.items()},
            "cpu_samples_ms": {k: [round(1000 * x, 1) for x in v] for k, v in cpu_times.items()},
            "cached_ratio_cpu_paired": paired("cached", "student", cpu_times),
            "live_ratio_cpu_paired": statistics.median(
                x / (y + z)
                for x, y, z in zip(cpu_times["live"], cpu_times["student"], cpu_times["teacher"], strict=True)
            ),
            "ratio": med["live"] / (med["student"] + med["teacher"]),
            "cached_ratio": med["cached"] / med["student"],
            "cached_ratio_paired": paired("cached", "student"),
            "cached_ratio_min": low["cached"] / low["student"],
            "live_ratio_paired": statistics.median(
                x / (y + z) for x, y, z in zip(times["live"], times["student"], times["teacher"], strict=True)
            ),
            # Paired: differences of steps on the same batch, seconds apart.
            "filling_extra_ms": 1000
            * statistics.median(f - v for f, v in zip(times["filling"], times["live"], strict=True)),
            # A pre-pass pays its own pass per batch, then epoch 1 runs at the cached speed instead of filling.
            "prepass_net_ms": 1000
            * statistics.median(
                p - (f - c) for p, f, c in zip(times["prepass"], times["filling"], times["cached"], strict=True)
            ),
            "regions_share": med["regions"] / med["live"],
            "locations_per_batch": {k: statistics.mean(v) for k, v in sizes.items()},
            "cache": cache.report(),
        }


# ----------------------------------------------------------------------------------------------- cache size


def _criterion(classes: list[str], spec: DistillSpec) -> DistillCriterion:
    """A narrow student and teacher with ``classes``: the rows' width and the regions decide the bytes, the
    networks' depth does not."""
    student = build_detector("gfl_tiny", len(classes), classes)
    teacher = build_detector("gfl_tiny", len(classes), classes)
    return DistillCriterion(GFLCriterion(student, GFLWeights()), teacher, spec, map_classes(classes, classes))


@torch.no_grad()
def _fill(cache: TeacherCache, samples) -> tuple[int, float]:
    """Both flips of every ``(image (3, H, W), target)``; returns (images, mean boxes per image)."""
    n, boxes = 0, 0
    for image, target in samples:
        width = image.shape[-1]
        b = target["boxes"]
        mirrored = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)
        for flipped, im, bx in ((False, image, b), (True, image.flip(-1), mirrored)):
            cache(*collate([(im, {**target, "boxes": bx, "flipped": flipped})]))
        n, boxes = n + 1, boxes + len(b)
    return n, boxes / max(n, 1)


def _coco_like(n: int, size: tuple[int, int], seed: int):
    """``n`` noise images of ``size = (w, h)`` with 7 or 8 boxes (7.3 on average), box areas drawn from COCO's
    mix (41% small < 32^2, 34% medium < 96^2, 24% large, at COCO's ~640x480, scaled with the resize)."""
    g = torch.Generator().manual_seed(seed)
    w, h = size
    scale = h / 480
    for i in range(n):
        k = 8 if i % 10 < 3 else 7
        u = torch.rand(k, generator=g)
        lo = torch.where(u < 0.41, 8.0, torch.where(u < 0.75, 32.0, 96.0))
        hi = torch.where(u < 0.41, 32.0, torch.where(u < 0.75, 96.0, 400.0))
        side = torch.exp(torch.log(lo) + torch.rand(k, generator=g) * (torch.log(hi) - torch.log(lo))) * scale
        aspect = torch.exp((torch.rand(k, generator=g) - 0.5) * math.log(4))  # 1/2 .. 2
        bw, bh = (side * aspect.sqrt()).clamp(4, w - 1), (side / aspect.sqrt()).clamp(4, h - 1)
        x1, y1 = torch.rand(k, generator=g) * (w - bw), torch.rand(k, generator=g) * (h - bh)
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], 1)
        image = torch.randn((3, h, w), generator=g)
        yield image, {"boxes": boxes, "labels": torch.randint(80, (k,), generator=g), "image_id": i + 1, "size": (h, w)}


def cache_sizes(coco_images: int = 20) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if BCCD.is_dir():
            import_voc(BCCD, tmp_path / "bccd")
            data = load_coco(tmp_path / "bccd")
            train_ids, _ = split(data, 0.2, 0)
            dataset = DetectionDataset(data, train_ids, image_size=(640, 480))
            cache = TeacherCache(tmp_path / "bccd_cache", _criterion(data.classes, DistillSpec()))
            n, boxes = _fill(cache, (dataset[i] for i in range(len(dataset))))
            rows.append(
                {
                    "dataset": "BCCD train split (measured)",
                    "input": "640x480",
                    "classes": len(data.classes),
                    "images": n,
                    "boxes_per_image": boxes,
                    "entries": len(cache.index),
                    "bytes_per_image": cache.bytes() / n,
                    "total_gb": cache.bytes() / 1e9,
                    "dense": False,
                }
            )
        coco_classes = [f"c{i}" for i in range(80)]
        for dense in (False, True):
            # BCKD's terms read every location: every entry holds them all (two images tell the size).
            spec = DistillSpec.model_validate({"method": "bckd"} if dense else {})
            cache = TeacherCache(tmp_path / f"coco_cache_{dense}", _criterion(coco_classes, spec))
            n, boxes = _fill(cache, _coco_like(2 if dense else coco_images, (1333, 800), seed=0))
            per_image = cache.bytes() / n
            rows.append(
                {
                    "dataset": "COCO train2017 (on paper" + (", BCKD terms: dense)" if dense else ")"),
                    "input": "1333x800",
                    "classes": 80,
                    "images": COCO_TRAIN_IMAGES,
                    "measured_on": f"{n} synthetic images",
                    "boxes_per_image": boxes,
                    "entries": len(cache.index),
                    "bytes_per_image": per_image,
                    "total_gb": per_image * COCO_TRAIN_IMAGES / 1e9,
                    "dense": dense,
                }
            )
    return rows


CACHE_EPOCHS = 12


def schedule_hits(size: tuple[int, int], batch: int) -> dict:
    """The teacher cache's hit rate over ``CACHE_EPOCHS`` epochs of raccoon's loader (``cache_hits.count``)."""
    from ablation_plan import Plan, prepare_data
    from cache_hits import count

    with tempfile.TemporaryDirectory() as tmp:
        return count(prepare_data(Plan(dataset="raccoon"), Path(tmp)), size, batch, CACHE_EPOCHS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="gfl_r18")
    parser.add_argument("--teacher", default="gfl_r101")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 320), metavar=("LONG", "SHORT"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-sizes", action="store_true", help="skip the cache size table")
    parser.add_argument(
        "--data",
        choices=("synthetic", "raccoon"),
        default="synthetic",
        help="synthetic: one image size; raccoon: shared/data/raccoon-voc, mixed sizes (results: *_raccoon)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size)
    r = measure(args.student, args.teacher, size, args.batch, args.iters, args.warmup, args.device, args.data)
    ms = r["median_ms"]
    lines = [
        f"# Distillation step cost: {r['student']} from {r['teacher']} at {r['image_size'][0]}x{r['image_size'][1]}, "
        f"batch {r['batch']}, {r['data']} data",
        "",
        f"device: {r['device']} ({r['device_name']}), torch {r['torch']}, threads {r['threads']}, amp {r['amp']}; "
        f"medians of {r['iters']} steps after {r['warmup']} warm-up steps, all rows in the same run",
        "",
        "| student step (ms) | teacher forward (ms) | LD step, live teacher (ms) | live / (student + teacher) | "
        "LD step, cached teacher (ms) | cached / student | regions (ms) | regions share of the step |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {ms['student']:.1f} | {ms['teacher']:.1f} | {ms['live']:.1f} | {r['ratio']:.3f} (target <= 1.10) "
        f"| {ms['cached']:.1f} | {r['cached_ratio']:.3f} (target <= 1.10) | {ms['regions']:.2f} "
        f"| {100 * r['regions_share']:.2f}% (target < 5%) |",
        "",
        "Filling the cache: in the first epoch, or by a pre-pass?",
        "",
        "| LD step while filling (ms) | extra over a live step, same batch (ms) | pre-pass per batch: load + teacher "
        "+ store (ms) | pre-pass net of the cached epoch 1 it buys, same batch (ms) |",
        "|---:|---:|---:|---:|",
        f"| {ms['filling']:.1f} | {r['filling_extra_ms']:.1f} | {ms['prepass']:.1f} (load {ms['load']:.1f}) "
        f"| {r['prepass_net_ms']:.1f} |",
        "",
        "The same ratios three ways (this CPU is shared: load from other processes moves single steps by tens of "
        "per cent):",
        "",
        "| | ratio of medians | median of per-batch ratios (same batch, seconds apart) | ratio of fastest steps "
        "| median of per-batch ratios of CPU time |",
        "|---|---:|---:|---:|---:|",
        f"| LD cached / student | {r['cached_ratio']:.3f} | {r['cached_ratio_paired']:.3f} "
        f"| {r['cached_ratio_min']:.3f} | {r['cached_ratio_cpu_paired']:.3f} |",
        f"| LD live / (student + teacher) | {r['ratio']:.3f} | {r['live_ratio_paired']:.3f} "
        f"| {r['min_ms']['live'] / (r['min_ms']['student'] + r['min_ms']['teacher']):.3f} "
        f"| {r['live_ratio_cpu_paired']:.3f} |",
    ]
    if not args.no_sizes:
        r["cache_sizes"] = cache_sizes()
        lines += [
            "",
            "## Teacher cache size (default terms: Main LD + VLR LD + Main KD; fp16; both flips of every image)",
            "",
            "| data | input | classes | images | boxes per image | bytes per image | total (GB) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for s in r["cache_sizes"]:
            measured = f" (measured on {s['measured_on']})" if "measured_on" in s else ""
            lines.append(
                f"| {s['dataset']}{measured} | {s['input']} | {s['classes']} | {s['images']} "
                f"| {s['boxes_per_image']:.2f} | {s['bytes_per_image']:,.0f} | {s['total_gb']:.3f} |"
            )
    if args.data == "raccoon":
        r["cache_hits"] = schedule_hits(size, args.batch)
        h = r["cache_hits"]["now"]
        lines += [
            "",
            f"The cached step above is a hit by construction (the same batch again). Over a training schedule of this "
            f"loader ({CACHE_EPOCHS} epochs, random flips, batches grouped by aspect ratio; `bench/cache_hits.py`'s "
            f"count), the cache answers {h['hit_rate']:.3f} of the teacher lookups (hit rate), with "
            f"{h['entries_per_image']} entries per image and {h['passes_over_pairs']} teacher passes per distinct "
            "(image, flip) pair (target <= 1.05).",
        ]
    print("\n".join(lines))
    suffix = "" if args.data == "synthetic" else f"_{args.data}"
    save(f"distill_speed_{device_tag(r['device'])}{suffix}", r, "\n".join(lines))


if __name__ == "__main__":
    main()

"""Pascal VOC XML -> the project's COCO dataset folder.

Both layouts are found the same way: every ``*.xml`` under the root (``Annotations/*.xml`` beside
``JPEGImages/``, or XML files beside their images anywhere). Each XML's image is looked up by its
``<filename>`` beside the XML, in ``JPEGImages/``, or anywhere under the root; failing that, by the XML's
stem with a common image extension.

Box convention: VOC corners are 1-based inclusive pixel indices; pixel ``i`` covers the continuous interval
``[i - 1, i]``. We convert to continuous 0-based coordinates, ``x = xmin - 1``, ``w = xmax - xmin + 1``
(as mmdetection 1.x and Detectron did): a box over the whole image becomes exactly ``[0, 0, W, H]``, and the
later resize (multiply) and flip (``W - x``) are exact in these coordinates. Tools that write 0-based
corners end up at most one pixel off, which the clipping absorbs.

``difficult=1`` objects become ``iscrowd=1``: ignored in training, kept (as crowd) in evaluation. A box
whose corners coincide in an axis (``xmin == xmax`` or ``ymin == ymax``: a point or a line, as two boxes of
BCCD are) is dropped with a warning (``annotations.degenerate_box`` says why).

Splits: ``ImageSets/Main/{train,val,test}.txt`` (one image id, the file stem, per line) give each image its
``split`` when present; ``trainval.txt`` counts as ``train`` only where there is no ``train.txt`` or
``val.txt`` beside it (otherwise it is just their union). ``annotations.split`` then trains on ``train``,
validates on ``val`` and holds ``test`` out (``test`` validates when there is no ``val``).
Torch-free.
"""

from __future__ import annotations

import csv
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from distill.data.annotations import DatasetError, check_box, degenerate_box, write_coco
from distill.data.images import probe_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Which ImageSets/Main list gives which split (VOC's layout); trainval only where train/val are absent.
IMAGE_SETS = {"train": "train", "val": "val", "test": "test"}


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` with one of ``suffixes`` (any case), skipping hidden and ``__MACOSX`` folders."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in suffixes
        and p.is_file()
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts)
    )


def _find_image(xml: Path, file_name: str, root: Path, by_name: dict[str, list[Path]]) -> Path | None:
    names = [Path(file_name).name] if file_name else []
    names += [xml.stem + ext for ext in IMAGE_EXTENSIONS]
    for name in names:
        for candidate in (xml.parent / name, root / "JPEGImages" / name):
            if candidate.is_file():
                return candidate
        found = by_name.get(name.lower(), [])
        if len(found) == 1:
            return found[0]
    return None


def _image_set_files(root: Path, image_sets: dict[str, str] | None) -> list[tuple[Path, str]]:
    """``(list file, split name)`` for every ``ImageSets/Main`` folder under ``root``.

    ``image_sets`` maps a list's stem to a split name (default ``IMAGE_SETS``, plus ``trainval -> train``
    where that folder has neither ``train.txt`` nor ``val.txt``)."""
    found = []
    for main in sorted(p for p in root.rglob("Main") if p.is_dir() and p.parent.name == "ImageSets"):
        if any(part.startswith(".") or part == "__MACOSX" for part in main.relative_to(root).parts):
            continue
        mapping = dict(image_sets) if image_sets is not None else dict(IMAGE_SETS)
        if image_sets is None and not (main / "train.txt").is_file() and not (main / "val.txt").is_file():
            mapping["trainval"] = "train"
        found += [(main / f"{stem}.txt", name) for stem, name in mapping.items() if (main / f"{stem}.txt").is_file()]
    return found


def _apply_image_sets(
    root: Path,
    found: list[tuple[Path, str]],
    images: dict[Path, dict[str, Any]],
    problems: list[str],
    warnings: list[str],
) -> None:
    """Set ``split`` on the images (keyed by their XML file) listed in ``found``'s files.

    A list applies to the XML files under its VOC folder (the parent of ``ImageSets``), matched by the
    XML's or the image's stem. An image in two lists with different splits is a problem; ids that match
    no annotated image (e.g. lists kept from the full set beside a subset of it) and annotated images in
    no list (they train) are warnings."""
    splits: dict[Path, dict[str, str]] = {}  # xml -> {list file: split}
    for list_file, name in found:
        voc_root = list_file.parent.parent.parent
        by_stem: dict[str, Path] = {}
        for xml, im in images.items():
            if xml.is_relative_to(voc_root):
                by_stem.setdefault(xml.stem, xml)
                by_stem.setdefault(Path(im["file_name"]).stem, xml)
        where = list_file.relative_to(root).as_posix()
        unmatched = []
        for line in list_file.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.split():
                continue
            image_id = line.split()[0]  # class lists ("id  1") carry a flag after the id
            xml = by_stem.get(image_id)
            if xml is None:
                unmatched.append(image_id)
            else:
                splits.setdefault(xml, {})[where] = name
        if unmatched:
            more = f" (and {len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
            warnings.append(
                f"{where}: {len(unmatched)} id(s) match no annotated image, ignored: {', '.join(unmatched[:5])}{more}"
            )
    if not found:
        return
    unlisted = []
    for xml, im in images.items():
        given = splits.get(xml, {})
        if len(set(given.values())) > 1:
            problems.append(
                f"{xml.relative_to(root).as_posix()}: listed in {' and '.join(sorted(given))}: which split is it in?"
            )
        elif given:
            im["split"] = next(iter(given.values()))
        else:
            unlisted.append(im["file_name"])
    if unlisted:
        more = f" (and {len(unlisted) - 5} more)" if len(unlisted) > 5 else ""
        warnings.append(
            f"{len(unlisted)} annotated image(s) are in no ImageSets list, so they train: "
            f"{', '.join(unlisted[:5])}{more}"
        )


def voc_to_coco(root: str | os.PathLike[str], *, image_sets: dict[str, str] | None = None) -> dict[str, Any]:
    """A COCO dict from the Pascal VOC XML files under ``root``; ``file_name``s are relative to ``root``.

    Classes are the sorted set of ``<name>``s (category ids ``1..C``), image ids ``1..N`` in XML path order.
    Problems (unparsable XML, missing or undecodable image, bad or out-of-image boxes) are collected in the
    dict's ``"problems"`` list, each naming its file; those files or boxes are left out. Degenerate boxes
    (a point or a line) are left out too and listed in ``"warnings"``. Images get their ``split`` from
    ``ImageSets/Main/*.txt`` when present; ``image_sets`` maps list names to splits instead of the default
    (e.g. ``{"trainval": "train", "test": "test"}`` trains on trainval and evaluates on test). Raises
    ``DatasetError`` when no usable annotated image is found at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    xml_files = _files(root, (".xml",))
    if not xml_files:
        raise DatasetError(f"no Pascal VOC XML files found under {root.name or root}")
    by_name: dict[str, list[Path]] = {}
    for p in _files(root, IMAGE_EXTENSIONS):
        by_name.setdefault(p.name.lower(), []).append(p)

    problems: list[str] = []
    warnings: list[str] = []
    damaged: list[str] = []  # image files that cannot be decoded: dropped, reported apart (see CocoData.damaged)
    images: list[dict[str, Any]] = []
    image_of_xml: dict[Path, dict[str, Any]] = {}
    objects: list[tuple[int, str, list[float], int]] = []  # image id, class name, xywh, iscrowd
    used: set[Path] = set()
    for xml in xml_files:
        where = xml.relative_to(root).as_posix()
        try:
            ann = ET.parse(xml).getroot()
        except ET.ParseError as e:
            problems.append(f"{where}: cannot parse XML ({e})")
            continue
        if ann.tag != "annotation":
            problems.append(f"{where}: not a Pascal VOC annotation (root element <{ann.tag}>), skipped")
            continue
        file_name = (ann.findtext("filename") or "").strip()
        image_path = _find_image(xml, file_name, root, by_name)
        if image_path is None:
            problems.append(f"{where}: image {file_name or xml.stem!r} not found")
            continue
        rel = image_path.relative_to(root).as_posix()
        if image_path in used:
            problems.append(f"{where}: image {rel} already annotated by another XML file, skipped")
            continue
        try:
            width, height = probe_image(image_path, None)
        except Exception as e:  # Pillow raises many types for damaged files
            damaged.append(f"{rel}: cannot decode image ({type(e).__name__}: {e})")
            continue
        size = (ann.findtext("size/width"), ann.findtext("size/height"))
        if all(size) and size != ("0", "0") and size != (str(width), str(height)):
            problems.append(
                f"{where}: size {size[0]}x{size[1]} differs from the image's {width}x{height}, using the image's"
            )
        used.add(image_path)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": rel, "width": width, "height": height})
        image_of_xml[xml] = images[-1]
        for n, obj in enumerate(ann.findall("object")):
            name = (obj.findtext("name") or "").strip()
            try:
                x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}") or "") for k in ("xmin", "ymin", "xmax", "ymax"))
                difficult = int(float(obj.findtext("difficult") or 0))
            except ValueError:
                problems.append(f"{where}: object {n}: missing or non-numeric bndbox, dropped")
                continue
            if not name:
                problems.append(f"{where}: object {n}: no <name>, dropped")
                continue
            # Equal corners: a point or a line (1 pixel by VOC's inclusive rule), which marks no object.
            degenerate = degenerate_box(x2 - x1, y2 - y1)
            if degenerate:
                warnings.append(f"{where}: object {n} ({name} {x1:g},{y1:g},{x2:g},{y2:g}) is {degenerate}")
                continue
            box, note = check_box([x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], width, height)
            if note:
                problems.append(f"{where}: object {n} ({x1:g},{y1:g},{x2:g},{y2:g}): {note}")
            if box is not None:
                objects.append((image_id, name, box, int(difficult == 1)))
    if not images:
        raise DatasetError("no usable annotated image: " + "; ".join((problems + damaged)[:5]))
    _apply_image_sets(root, _image_set_files(root, image_sets), image_of_xml, problems, warnings)

    classes = sorted({name for _, name, _, _ in objects})
    category = {name: i + 1 for i, name in enumerate(classes)}
    return {
        "images": images,
        "annotations": [
            {
                "id": k + 1,
                "image_id": image_id,
                "category_id": category[name],
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": crowd,
            }
            for k, (image_id, name, box, crowd) in enumerate(objects)
        ],
        "categories": [{"id": category[name], "name": name} for name in classes],
        "problems": problems,
        "warnings": warnings,
        "damaged": damaged,
    }


def apply_split_csv(coco: dict[str, Any], csv_path: str | os.PathLike[str], split_name: str) -> dict[str, Any]:
    """Set ``"split": split_name`` on the images listed in a CSV's ``filename`` column (matched by file
    name, without folders), e.g. raccoon-voc's ``data/train_labels.csv``. Names that match no image are
    added to ``coco["problems"]``. Returns ``coco`` (changed in place)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "filename" not in reader.fieldnames:
            raise DatasetError(f"{Path(csv_path).name}: no 'filename' column")
        listed = {row["filename"] for row in reader}
    by_name = {Path(im["file_name"]).name: im for im in coco["images"]}
    for name in sorted(listed):
        if name in by_name:
            by_name[name]["split"] = split_name
        else:
            coco.setdefault("problems", []).append(f"{Path(csv_path).name}: {name} matches no image")
    return coco


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # no copy when both are on one file system
    except OSError:
        shutil.copyfile(src, dst)


def import_voc(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    splits: dict[str, str | os.PathLike[str]] | None = None,
    image_sets: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Turn the VOC folder ``root`` into a dataset folder ``out_dir`` (``images/`` + ``annotations.json``).

    Images keep their path relative to their common folder under ``out_dir/images/`` (hard-linked when possible,
    else copied). ``splits`` maps a split name to a CSV for ``apply_split_csv``, e.g.
    ``{"train": ".../train_labels.csv", "val": ".../test_labels.csv"}`` (applied after the ``ImageSets``
    lists, which ``image_sets`` maps as in ``voc_to_coco``). Returns the COCO dict written, with its
    ``"problems"`` and ``"warnings"``.
    """
    root, out_dir = Path(root), Path(out_dir)
    if out_dir.resolve() == root.resolve():
        raise DatasetError("import_voc needs an output folder other than the VOC folder")
    coco = voc_to_coco(root, image_sets=image_sets)
    for split_name, csv_path in (splits or {}).items():
        apply_split_csv(coco, csv_path, split_name)
    # Paths relative to the images' common folder: root/JPEGImages/a.jpg -> out_dir/images/a.jpg.
    common = Path(os.path.commonpath([Path(im["file_name"]).parent.as_posix() for im in coco["images"]]))
    for im in coco["images"]:
        rel = "images/" + Path(im["file_name"]).relative_to(common).as_posix()
        _link_or_copy(root / im["file_name"], out_dir / rel)
        im["file_name"] = rel
    write_coco(coco, out_dir)
    return coco

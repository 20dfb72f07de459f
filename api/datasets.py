"""Dataset uploads: safe zip extraction, COCO or VOC import, validation, atomic publication.

Everything happens in a private temporary folder under ``data_dir/tmp``; only a dataset that passed
every check is renamed into ``data_dir/datasets/<id>/`` (one ``os.rename`` on the same file system,
so a half-imported dataset is never visible). Any problem (wrong data) raises :class:`UploadError` with
the list of problems and leaves nothing behind. Warnings (things handled on the way: a degenerate box
dropped, an ``ImageSets`` id without an image) do not refuse the upload: they are its ``problems`` list.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from distill.data.annotations import DatasetError, file_sha256, has_own_split, load_coco, split_roles, write_coco
from distill.data.voc import import_voc

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_IGNORED_PREFIXES = ("__MACOSX/",)


class UploadError(ValueError):
    """A refused upload: ``status`` (400, 413 or 422), a machine ``code``, a message and details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


@dataclass(frozen=True)
class ZipLimits:
    """Zip-bomb guards: total uncompressed bytes, its ratio to the archive size, and entry count."""

    max_total_bytes: int
    max_ratio: float = 100.0
    max_entries: int = 200_000


@dataclass
class ImportedDataset:
    root: Path  # the folder that becomes datasets/<id>/
    format: str  # "coco" or "voc"
    classes: list[str]
    num_images: int
    num_boxes: int
    splits: dict[str, int]
    problems: list[str] = field(default_factory=list)  # reported, not refusing (the import's warnings)
    # The split every job uses: drawn with val_split and split_seed (both None when the images' own split
    # decides); per image its id, file name, content hash and part ("train", "val", "test").
    val_split: float | None = None
    split_seed: int | None = None
    images: list[dict[str, Any]] = field(default_factory=list)


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The entry's relative path, or raise for one that could escape the extraction folder."""
    name = info.filename.replace("\\", "/")
    if name.startswith(_IGNORED_PREFIXES) or name.endswith("/"):
        return None
    p = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
        raise UploadError(400, "unsafe_archive", f"zip entry {info.filename!r} points outside the upload folder")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UploadError(400, "unsafe_archive", f"zip entry {info.filename!r} is a symbolic link")
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
        raise UploadError(400, "unsafe_archive", f"zip entry {info.filename!r} is not a regular file")
    if p.name.startswith("._"):  # macOS resource forks
        return None
    return p


def safe_extract(zip_path: Path, dest: Path, limits: ZipLimits) -> list[PurePosixPath]:
    """Extract ``zip_path`` into ``dest``; refuse path traversal, links and zip bombs.

    Declared sizes are checked before anything is written, and the bytes actually written are
    counted too (a crafted archive can lie about its sizes).
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UploadError(400, "bad_archive", f"the upload is not a readable zip archive: {e}") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_entries:
            raise UploadError(
                413, "archive_too_large", f"the zip has {len(infos)} entries (limit {limits.max_entries})"
            )
        members = [(i, p) for i in infos if (p := _member_path(i)) is not None]
        declared = sum(i.file_size for i, _ in members)
        archive_size = max(1, zip_path.stat().st_size)
        _check_total(declared, archive_size, limits)
        written = 0
        dest.mkdir(parents=True, exist_ok=True)
        for info, rel in members:
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        _check_total(written, archive_size, limits)
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
                raise UploadError(400, "bad_archive", f"cannot extract {info.filename!r}: {e}") from e
            except RuntimeError as e:  # encrypted entries
                raise UploadError(400, "bad_archive", f"cannot extract {info.filename!r}: {e}") from e
    return [rel for _, rel in members]


def _check_total(total: int, archive_size: int, limits: ZipLimits) -> None:
    if total > limits.max_total_bytes:
        raise UploadError(
            413,
            "archive_too_large",
            f"the zip expands to more than {limits.max_total_bytes} bytes (zip bomb guard)",
        )
    # Small archives are exempt from the ratio rule: a few KB of JSON compresses well and is harmless.
    if total > 16 * 2**20 and total / archive_size > limits.max_ratio:
        raise UploadError(
            413,
            "archive_too_large",
            f"the zip expands more than {limits.max_ratio:.0f}x its size (zip bomb guard)",
        )


def _find_annotations(root: Path, files: list[PurePosixPath]) -> tuple[str, Path]:
    jsons = [f for f in files if f.suffix.lower() == ".json"]
    xmls = [f for f in files if f.suffix.lower() == ".xml"]
    if len(jsons) > 1:
        named = [f for f in jsons if f.name == "annotations.json"]
        if len(named) != 1:
            raise UploadError(
                422,
                "invalid_dataset",
                "the zip holds several JSON files; put exactly one COCO annotation file in it "
                "(or name it annotations.json)",
                [str(f) for f in jsons[:20]],
            )
        jsons = named
    if jsons:
        return "coco", root.joinpath(*jsons[0].parts)
    if xmls:
        return "voc", root
    raise UploadError(
        422,
        "invalid_dataset",
        "no annotations found: the zip needs one COCO JSON file or Pascal VOC XML files beside the images",
    )


def _check_file_names(coco: dict[str, Any]) -> list[str]:
    bad = []
    for img in coco.get("images", []) if isinstance(coco, dict) else []:
        name = str(img.get("file_name", "")) if isinstance(img, dict) else ""
        p = PurePosixPath(name.replace("\\", "/"))
        if name.startswith("/") or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
            bad.append(f"{name}: file_name must be relative to the annotation file's folder")
    return bad


def import_dataset(
    zip_path: Path,
    work: Path,
    limits: ZipLimits,
    max_image_pixels: int,
    val_split: float = 0.2,
    split_seed: int = 0,
    max_bad_fraction: float = 0.05,
) -> ImportedDataset:
    """Extract and validate an uploaded zip under ``work`` (a private temp folder), and fix its split: the images'
    own when they name a validation or test split, else a draw of ``val_split`` seeded by ``split_seed``
    (``distill.data.annotations.split``, the function training uses), with each image's content hash.

    COCO: the folder of the JSON file becomes the dataset (the JSON renamed ``annotations.json``).
    VOC: ``distill.data.voc.import_voc`` writes ``work/dataset`` (``images/`` + ``annotations.json``), the
    splits taken from ``ImageSets/Main/{train,val,test}.txt`` when present.

    Returns the folder ready to be moved into place, its warnings as ``problems``. Raises
    :class:`UploadError` with every problem found (problems are never silently dropped: a dataset with any
    problem is refused), except damaged image files (truncated or corrupt, as real photo sets have a few):
    those images are dropped and listed in ``problems``, unless they are more than ``max_bad_fraction`` of
    the images, when the upload is refused naming them.
    """
    raw = work / "raw"
    files = safe_extract(zip_path, raw, limits)
    fmt, ann = _find_annotations(raw, files)
    if fmt == "coco":
        root = ann.parent
        try:
            coco = json.loads(ann.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UploadError(422, "invalid_dataset", f"{ann.name} is not valid JSON: {e}") from e
        bad = _check_file_names(coco)
        if bad:
            raise UploadError(422, "invalid_dataset", f"{len(bad)} image paths are unsafe", bad[:50])
        if ann.name != "annotations.json":
            ann.rename(root / "annotations.json")
    else:
        root = work / "dataset"
        try:
            coco = import_voc(raw, root)
        except (DatasetError, ValueError, OSError) as e:
            raise UploadError(422, "invalid_dataset", f"cannot read the VOC annotations: {e}") from e
        problems = [str(p) for p in coco.get("problems", [])]
        if problems:
            raise UploadError(422, "invalid_dataset", _problem_message(problems), problems[:200])
    try:
        data = load_coco(root, check_images=True, max_pixels=max_image_pixels)
    except DatasetError as e:
        raise UploadError(422, "invalid_dataset", str(e)) from e
    problems = list(data.problems)
    if not data.images:
        problems.append("the dataset has no usable images")
    if problems:
        raise UploadError(422, "invalid_dataset", _problem_message(problems), problems[:200] + data.damaged[:200])
    total = len(data.images) + len(data.damaged)
    if len(data.damaged) > max_bad_fraction * total:
        raise UploadError(
            422,
            "too_many_damaged_images",
            f"{len(data.damaged)} of {total} images cannot be decoded, more than {max_bad_fraction:.0%} "
            f"(LDD_MAX_BAD_IMAGE_FRACTION): {_problem_message(data.damaged)}",
            data.damaged[:200],
        )
    if data.damaged:
        _drop_damaged(root / "annotations.json", {im["id"] for im in data.images}, data.damaged)
    summary = data.summary()
    drawn = not has_own_split(data)
    roles = split_roles(data, val_split, split_seed)
    images = [{"image_id": im["id"], "file_name": im["file_name"], "sha256": file_sha256(im["path"]),
               "split": roles[im["id"]]} for im in data.images]  # fmt: skip
    return ImportedDataset(
        root=root,
        format=fmt,
        classes=list(data.classes),
        num_images=summary["num_images"],
        num_boxes=summary["num_boxes"],
        splits=dict(summary["splits"] or {}),
        problems=[*data.damaged, *data.warnings],
        val_split=val_split if drawn else None,
        split_seed=split_seed if drawn else None,
        images=images,
    )


def _drop_damaged(annotations: Path, usable: set[int], damaged: list[str]) -> None:
    """Rewrite the published annotations without the images dropped as damaged (and their boxes), keeping
    the list, so every later reader sees the same images without opening the damaged files again."""
    coco = json.loads(annotations.read_text(encoding="utf-8"))
    coco["images"] = [im for im in coco["images"] if im.get("id") in usable]
    coco["annotations"] = [a for a in coco["annotations"] if a.get("image_id") in usable]
    coco["damaged"] = damaged
    write_coco(coco, annotations)


def _problem_message(problems: list[str]) -> str:
    head = "; ".join(problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"the dataset has {len(problems)} problem(s): {head}{more}"


def publish_dataset(imported: ImportedDataset, datasets_dir: Path, dataset_id: str) -> Path:
    """Move the validated folder into ``datasets_dir/<id>`` in one rename."""
    datasets_dir.mkdir(parents=True, exist_ok=True)
    final = datasets_dir / dataset_id
    os.rename(imported.root, final)
    return final


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

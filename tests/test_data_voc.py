"""Pascal VOC import: the real raccoon set with its official split, and hand-made folders in both layouts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from distill.data.annotations import DatasetError, load_coco, split
from distill.data.voc import apply_split_csv, import_voc, voc_to_coco
from tests.shared_data import needs_shared, shared_path

RACCOON = shared_path("data/raccoon-voc")


def _xml(filename: str, size: tuple[int, int] | None, objects: list[tuple[str, tuple, int]]) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, difficult in objects
    )
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>x</folder><filename>{filename}</filename>{size_xml}{objs}</annotation>"


def _image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


@needs_shared("data/raccoon-voc")
def test_raccoon_import_with_official_split(tmp_path: Path) -> None:
    coco = import_voc(
        RACCOON,
        tmp_path / "ds",
        splits={"train": RACCOON / "data/train_labels.csv", "val": RACCOON / "data/test_labels.csv"},
    )
    assert coco["problems"] == []
    assert len(coco["images"]) == 200 and len(coco["annotations"]) == 217
    assert coco["categories"] == [{"id": 1, "name": "raccoon"}]

    data = load_coco(tmp_path / "ds")
    assert data.problems == [] and data.classes == ["raccoon"] and data.num_boxes == 217
    train, val = split(data, 0.5, seed=0)  # the split field wins over val_split
    assert (len(train), len(val)) == (160, 40)
    n_train_boxes = sum(len(data.boxes(i)[1]) for i in train)
    assert (n_train_boxes, data.num_boxes - n_train_boxes) == (173, 44)  # as the CSVs list them

    # raccoon-1.xml: <xmin>81 <ymin>88 <xmax>522 <ymax>408 (1-based, inclusive) in a 650x417 image.
    first = next(im for im in data.images if im["file_name"] == "images/raccoon-1.jpg")
    assert (first["width"], first["height"]) == (650, 417)
    assert data.annotations[first["id"]][0]["bbox"] == [80.0, 87.0, 442.0, 321.0]
    assert (tmp_path / "ds/images/raccoon-1.jpg").stat().st_size == (RACCOON / "images/raccoon-1.jpg").stat().st_size


def test_voc_layout_annotations_and_jpegimages(tmp_path: Path) -> None:
    root = tmp_path / "VOC"
    _image(root / "JPEGImages/000001.jpg", (100, 80))
    _image(root / "JPEGImages/000002.png", (60, 50))
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations/000001.xml").write_text(
        _xml(
            "000001.jpg",
            (100, 80),
            [
                ("person", (1, 1, 100, 80), 0),  # the whole image -> exactly [0, 0, 100, 80]
                ("bird", (11, 21, 30, 40), 1),  # difficult -> iscrowd
            ],
        )
    )
    # <filename> is wrong (a common VOC quirk): found by the XML's stem instead.
    (root / "Annotations/000002.xml").write_text(_xml("renamed.jpg", (60, 50), [("cat", (5, 5, 20, 20), 0)]))
    coco = voc_to_coco(root)
    assert coco["problems"] == []
    assert [c["name"] for c in coco["categories"]] == ["bird", "cat", "person"]
    assert [im["file_name"] for im in coco["images"]] == ["JPEGImages/000001.jpg", "JPEGImages/000002.png"]
    anns = {(a["image_id"], a["category_id"]): a for a in coco["annotations"]}
    assert anns[(1, 3)]["bbox"] == [0.0, 0.0, 100.0, 80.0] and anns[(1, 3)]["iscrowd"] == 0
    assert anns[(1, 1)]["bbox"] == [10.0, 20.0, 20.0, 20.0] and anns[(1, 1)]["iscrowd"] == 1

    import_voc(root, tmp_path / "out")
    data = load_coco(tmp_path / "out")
    assert data.problems == [] and [im["file_name"] for im in data.images] == ["images/000001.jpg", "images/000002.png"]
    assert data.num_boxes == 2  # the difficult bird is evaluation-only
    assert len(data.ground_truth()["annotations"]) == 3


def test_xml_beside_images_with_problems(tmp_path: Path) -> None:
    root = tmp_path / "upload"
    _image(root / "set_a/cat1.jpg", (50, 40))
    _image(root / "set_b/dog1.png", (30, 30))
    _image(root / "set_b/cat1.jpg", (20, 20))  # same name elsewhere: the one beside the XML wins
    (root / "set_a/cat1.xml").write_text(
        _xml(
            "cat1.jpg",
            (50, 40),
            [
                ("cat", (2, 2, 30, 30), 0),
                ("cat", (30, 5, 10, 20), 0),  # xmax < xmin
                ("cat", (40, 30, 70, 60), 0),  # sticks out far: clipped and reported
            ],
        )
    )
    (root / "set_b/dog1.xml").write_text(_xml("dog1.png", None, [("dog", (1, 1, 30, 30), 0)]))
    (root / "set_b/broken.xml").write_text("<annotation><filename>x.jpg</filename>")
    (root / "set_b/lost.xml").write_text(_xml("lost.jpg", (10, 10), [("dog", (1, 1, 5, 5), 0)]))
    (root / "set_b/wrongsize.xml").write_text(_xml("cat1.jpg", (99, 99), [("cat", (1, 1, 5, 5), 0)]))
    (root / "set_b/notvoc.xml").write_text("<svg></svg>")
    (root / "set_b/dup.xml").write_text(_xml("dog1.png", None, [("dog", (1, 1, 9, 9), 0)]))
    _image(root / "set_b/pic.png", (10, 10))
    (root / "set_b/text.xml").write_text(
        "<annotation><filename>pic.png</filename><object><name>dog</name><bndbox><xmin>a</xmin></bndbox>"
        "</object></annotation>"
    )
    _image(root / "set_b/torn.jpg", (40, 30))  # a truncated JPEG: damaged, dropped apart from the problems
    (root / "set_b/torn.jpg").write_bytes((root / "set_b/torn.jpg").read_bytes()[:60])
    (root / "set_b/torn.xml").write_text(_xml("torn.jpg", (40, 30), [("cat", (1, 1, 9, 9), 0)]))
    coco = voc_to_coco(root)
    assert len(coco["damaged"]) == 1 and coco["damaged"][0].startswith("set_b/torn.jpg: cannot decode image")
    problems = "\n".join(coco["problems"])
    assert [im["file_name"] for im in coco["images"]] == [
        "set_a/cat1.jpg",
        "set_b/dog1.png",
        "set_b/pic.png",
        "set_b/cat1.jpg",
    ]
    assert any(p.startswith("set_a/cat1.xml: object 1") and "non-positive" in p for p in coco["problems"]), problems
    assert any(p.startswith("set_a/cat1.xml: object 2") and "clipped" in p for p in coco["problems"]), problems
    assert any(p.startswith("set_b/broken.xml: cannot parse XML") for p in coco["problems"]), problems
    assert any(p.startswith("set_b/lost.xml: image 'lost.jpg' not found") for p in coco["problems"]), problems
    assert any(p.startswith("set_b/wrongsize.xml: size 99x99 differs") for p in coco["problems"]), problems
    assert any(p.startswith("set_b/notvoc.xml: not a Pascal VOC") for p in coco["problems"]), problems
    assert any(p.startswith("set_b/dup.xml") and "already annotated" in p for p in coco["problems"]), problems
    assert any(p.startswith("set_b/text.xml: object 0: missing or non-numeric") for p in coco["problems"]), problems
    assert len(coco["problems"]) == 8, problems
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    boxes = sorted(a["bbox"] for a in coco["annotations"])
    assert boxes == [[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 30.0, 30.0], [1.0, 1.0, 29.0, 29.0], [39.0, 29.0, 11.0, 11.0]]

    import_voc(root, tmp_path / "out")
    data = load_coco(tmp_path / "out")  # the import's problems travel with the dataset
    assert data.problems == coco["problems"] and data.damaged == coco["damaged"]
    assert sorted(im["file_name"] for im in data.images) == [
        "images/set_a/cat1.jpg",
        "images/set_b/cat1.jpg",
        "images/set_b/dog1.png",
        "images/set_b/pic.png",
    ]


def test_no_xml_or_nothing_usable_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no Pascal VOC XML"):
        voc_to_coco(tmp_path)
    (tmp_path / "a.xml").write_text(_xml("a.jpg", (5, 5), []))
    with pytest.raises(DatasetError, match="not found"):
        voc_to_coco(tmp_path)
    with pytest.raises(DatasetError, match="other than the VOC folder"):
        import_voc(tmp_path, tmp_path)


def test_apply_split_csv_reports_unknown_names(tmp_path: Path) -> None:
    coco = {"images": [{"id": 1, "file_name": "images/a.jpg"}, {"id": 2, "file_name": "images/b.jpg"}], "problems": []}
    (tmp_path / "val.csv").write_text("filename,width\na.jpg,3\na.jpg,3\nzzz.jpg,4\n")
    apply_split_csv(coco, tmp_path / "val.csv", "val")
    assert [im.get("split") for im in coco["images"]] == ["val", None]
    assert coco["problems"] == ["val.csv: zzz.jpg matches no image"]
    (tmp_path / "bad.csv").write_text("name\na.jpg\n")
    with pytest.raises(DatasetError, match="filename"):
        apply_split_csv(coco, tmp_path / "bad.csv", "val")


def test_command_line_import_and_check(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    _image(root / "a.jpg", (40, 30))
    (root / "a.xml").write_text(_xml("a.jpg", (40, 30), [("fox", (3, 4, 20, 25), 0)]))
    (root / "split.csv").write_text("filename\na.jpg\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.data",
            "import-voc",
            str(root),
            str(tmp_path / "out"),
            "--split",
            f"val={root / 'split.csv'}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 1 images, 1 boxes, 1 classes" in run.stdout and '"val": 1' in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "distill.data", "check", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_point_and_line_boxes_are_dropped_with_a_warning(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg", (60, 50))
    (tmp_path / "a.xml").write_text(
        _xml(
            "a.jpg",
            (60, 50),
            [
                ("cell", (5, 5, 20, 20), 0),
                ("cell", (30, 30, 30, 30), 0),  # a point (xmin == xmax, ymin == ymax), as in BCCD
                ("cell", (10, 40, 25, 40), 0),  # a line (ymin == ymax)
                ("cell", (30, 5, 10, 20), 0),  # xmax < xmin: wrong data, a problem
            ],
        )
    )
    coco = voc_to_coco(tmp_path)
    assert coco["warnings"] == [
        "a.xml: object 1 (cell 30,30,30,30) is a point, not a box (no width and no height): dropped",
        "a.xml: object 2 (cell 10,40,25,40) is a line, not a box (no height): dropped",
    ]
    assert len(coco["problems"]) == 1 and coco["problems"][0].startswith("a.xml: object 3")
    assert [a["bbox"] for a in coco["annotations"]] == [[4.0, 4.0, 16.0, 16.0]]
    import_voc(tmp_path, tmp_path / "out")
    assert load_coco(tmp_path / "out").warnings == coco["warnings"]  # they travel with the dataset


def _voc_with_image_sets(root: Path, lists: dict[str, list[str]], stems: list[str]) -> Path:
    for stem in stems:
        _image(root / f"JPEGImages/{stem}.jpg", (40, 30))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / f"Annotations/{stem}.xml").write_text(_xml(f"{stem}.jpg", (40, 30), [("x", (3, 4, 20, 25), 0)]))
    (root / "ImageSets/Main").mkdir(parents=True, exist_ok=True)
    for name, ids in lists.items():
        (root / f"ImageSets/Main/{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _splits(coco: dict) -> dict[str, str | None]:
    return {Path(im["file_name"]).stem: im.get("split") for im in coco["images"]}


def test_imagesets_give_the_splits(tmp_path: Path) -> None:
    stems = ["a", "b", "c", "d", "e"]
    lists = {
        "train": ["a", "b"],
        "val": ["c"],
        "trainval": ["a", "b", "c"],
        "test": ["d", "e"],
        "x_train": ["a  1", "b -1"],
    }  # a per-class list: not a split
    root = _voc_with_image_sets(tmp_path / "voc", lists, stems)
    coco = voc_to_coco(root)
    assert coco["problems"] == [] and coco["warnings"] == []
    assert _splits(coco) == {"a": "train", "b": "train", "c": "val", "d": "test", "e": "test"}
    import_voc(root, tmp_path / "out")
    data = load_coco(tmp_path / "out")
    assert data.summary()["splits"] == {"train": 2, "val": 1, "test": 2}
    assert split(data, 0.5, seed=0) == ([1, 2], [3])  # test is held out

    # The benchmark's reading: train on trainval, evaluate on test.
    coco = voc_to_coco(root, image_sets={"trainval": "train", "test": "test"})
    assert _splits(coco) == {"a": "train", "b": "train", "c": "train", "d": "test", "e": "test"}
    import_voc(root, tmp_path / "bench", image_sets={"trainval": "train", "test": "test"})
    assert split(load_coco(tmp_path / "bench"), 0.5, seed=0) == ([1, 2, 3], [4, 5])

    # Only trainval and test: trainval trains.
    root = _voc_with_image_sets(tmp_path / "voc2", {"trainval": ["a", "b", "c"], "test": ["d", "e"]}, stems)
    assert _splits(voc_to_coco(root)) == {"a": "train", "b": "train", "c": "train", "d": "test", "e": "test"}


def test_imagesets_conflicts_unknown_ids_and_unlisted_images(tmp_path: Path) -> None:
    lists = {"train": ["a", "b", "ghost", "b"], "test": ["b", "c"]}
    root = _voc_with_image_sets(tmp_path / "voc", lists, ["a", "b", "c", "d"])
    coco = voc_to_coco(root)
    assert coco["problems"] == [
        "Annotations/b.xml: listed in ImageSets/Main/test.txt and ImageSets/Main/train.txt: which split is it in?"
    ]
    assert coco["warnings"] == [
        "ImageSets/Main/train.txt: 1 id(s) match no annotated image, ignored: ghost",
        "1 annotated image(s) are in no ImageSets list, so they train: JPEGImages/d.jpg",
    ]
    assert _splits(coco) == {"a": "train", "b": None, "c": "test", "d": None}


def test_command_line_image_sets_and_warnings(tmp_path: Path) -> None:
    root = _voc_with_image_sets(tmp_path / "voc", {"trainval": ["a", "b"], "test": ["c"]}, ["a", "b", "c"])
    (root / "Annotations/b.xml").write_text(_xml("b.jpg", (40, 30), [("x", (3, 4, 20, 25), 0), ("x", (7, 7, 7, 7), 0)]))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.data",
            "import-voc",
            str(root),
            str(tmp_path / "out"),
            "--image-set",
            "trainval=train",
            "--image-set",
            "test=val",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr
    assert '"train": 2' in run.stdout and '"val": 1' in run.stdout
    assert "warning: Annotations/b.xml: object 1 (x 7,7,7,7) is a point" in run.stdout

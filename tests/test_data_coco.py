"""COCO reading and validation: bad files are reported by name, never crash; malformed JSON raises."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from distill.data.annotations import DatasetError, load_coco, split, write_coco
from distill.data.images import read_image


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 50, 50)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _dataset(root: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None) -> Path:
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}],
    }
    write_coco(coco, root)
    return root


def _ann(i: int, image_id: int, bbox: list[float], category_id: int = 1, **extra: object) -> dict:
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def test_valid_dataset(tmp_path: Path) -> None:
    _png(tmp_path / "images/a.png", (64, 48))
    _png(tmp_path / "images/b.png", (40, 30))
    _dataset(
        tmp_path,
        [
            {"id": 1, "file_name": "images/a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},  # found under images/
        ],
        [
            _ann(1, 1, [10, 5, 20, 10], category_id=3),
            _ann(2, 1, [0, 0, 64, 48], category_id=1, iscrowd=1),
            _ann(3, 2, [1, 2, 3, 4], category_id=1),
        ],
    )
    data = load_coco(tmp_path)
    assert data.problems == []
    assert data.classes == ["cat", "dog"] and data.category_ids == [1, 3]  # in category id order
    assert data.image_ids == [1, 2] and data.num_boxes == 2
    boxes, labels = data.boxes(1)  # iscrowd left out of training
    assert boxes.tolist() == [[10, 5, 30, 15]] and labels.tolist() == [1]
    gt = data.ground_truth([1])  # but kept for evaluation
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
    assert {c["id"] for c in gt["categories"]} == {1, 3}
    assert data.summary()["boxes_per_class"] == {"cat": 1, "dog": 1}
    assert load_coco(tmp_path / "annotations.json").image_ids == [1, 2]  # the JSON file itself works too


def test_bad_images_and_boxes_are_reported_by_file_name(tmp_path: Path) -> None:
    _png(tmp_path / "images/good.png", (100, 80))
    _png(tmp_path / "images/small.png", (50, 40))
    (tmp_path / "images/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    (tmp_path / "images/empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, "JPEG")
    (tmp_path / "images/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _dataset(
        tmp_path,
        [
            {"id": 1, "file_name": "images/good.png", "width": 100, "height": 80},
            {"id": 2, "file_name": "images/corrupt.jpg", "width": 10, "height": 10},
            {"id": 3, "file_name": "images/empty.jpg", "width": 10, "height": 10},
            {"id": 4, "file_name": "images/truncated.jpg", "width": 300, "height": 200},
            {"id": 5, "file_name": "images/missing.png", "width": 10, "height": 10},
            {"id": 6, "file_name": "images/small.png", "width": 100, "height": 80},  # wrong size in JSON
            {"id": 7, "file_name": "../outside.png", "width": 10, "height": 10},
            {"id": 1, "file_name": "images/small.png", "width": 50, "height": 40},  # duplicate id
        ],
        [
            _ann(1, 1, [10, 10, 20, 20]),  # fine
            _ann(2, 1, [90, 70, 30, 30]),  # sticks out far: clipped, reported
            _ann(3, 1, [-1, -1, 20, 20]),  # sticks out slightly: clipped silently
            _ann(4, 1, [150, 10, 20, 20]),  # wholly outside: dropped
            _ann(5, 1, [10, 10, 0, 5]),  # no width: dropped with a warning, not a problem
            _ann(10, 1, [10, 10, -3, 5]),  # negative width: wrong data
            _ann(6, 1, [10, 10, 5, 5], category_id=99),  # unknown category
            _ann(7, 42, [10, 10, 5, 5]),  # unknown image
            _ann(7, 1, [10, 10, 5, 5]),  # duplicate annotation id
            _ann(8, 6, [60, 10, 20, 20]),  # outside the real 50x40 image (inside the JSON's 100x80)
            _ann(9, 2, [1, 1, 2, 2]),  # on a dropped image: no extra noise
        ],
    )
    data = load_coco(tmp_path)
    text = "\n".join(data.problems)

    def said(name: str, what: str, where: list[str] = data.problems) -> bool:
        return any(p.startswith(name) and what in p for p in where)

    # Damaged files are listed apart from wrong data: an upload tolerates a few (LDD_MAX_BAD_IMAGE_FRACTION).
    assert said("images/corrupt.jpg", "cannot decode image", data.damaged), data.damaged
    assert said("images/empty.jpg", "cannot decode image", data.damaged), data.damaged
    assert said("images/truncated.jpg", "cannot decode image", data.damaged), data.damaged
    assert len(data.damaged) == 3
    assert said("images/missing.png", "not found"), text
    assert said("../outside.png", "not found"), text
    assert said("images/small.png", "differs from the image's 50x40"), text
    assert said("images/small.png", "duplicate image id 1"), text
    assert said("images/good.png: annotation 2", "clipped"), text
    assert said("images/good.png: annotation 4", "outside the image"), text
    assert said("images/good.png: annotation 10", "non-positive size"), text
    assert data.warnings == [
        "images/good.png: annotation 5: bbox [10, 10, 0, 5] is a line, not a box (no width): dropped"
    ]
    assert said("images/good.png: annotation 6", "unknown category id 99"), text
    assert said("annotations.json: annotation 7", "unknown image id 42"), text
    assert said("images/good.png: annotation 7", "duplicate annotation id"), text
    assert said("images/small.png: annotation 8", "outside the image"), text
    assert not any("annotation 9" in p for p in data.problems)
    assert len(data.problems) == 11, text

    assert data.image_ids == [1, 6]  # the bad images are not usable
    assert (data.image(6)["width"], data.image(6)["height"]) == (50, 40)  # the real size wins
    assert data.boxes(1)[0].tolist() == [[10, 10, 30, 30], [90, 70, 100, 80], [0, 0, 19, 19]]
    assert data.boxes(6)[0].shape == (0, 4)


def test_problems_recorded_in_the_file_are_reported(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (8, 8))
    write_coco(
        {
            "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
            "annotations": [],
            "categories": [{"id": 1, "name": "x"}],
            "problems": ["x.xml: cannot parse XML"],
            "warnings": ["y.xml: object 0 is a point"],
        },
        tmp_path,
    )
    data = load_coco(tmp_path)
    assert data.problems == ["x.xml: cannot parse XML"] and data.warnings == ["y.xml: object 0 is a point"]
    assert data.summary()["num_problems"] == 1 and data.summary()["num_warnings"] == 1


def test_check_images_false_trusts_the_json(tmp_path: Path) -> None:
    _dataset(tmp_path, [{"id": 1, "file_name": "nowhere.png", "width": 30, "height": 20}], [_ann(1, 1, [5, 5, 10, 10])])
    data = load_coco(tmp_path, check_images=False)
    assert data.problems == [] and data.image_ids == [1]
    _dataset(tmp_path, [{"id": 1, "file_name": "nowhere.png"}], [])
    with pytest.raises(DatasetError, match="width"):
        load_coco(tmp_path, check_images=False)


def test_max_pixels(tmp_path: Path) -> None:
    _png(tmp_path / "big.png", (200, 100))
    _dataset(tmp_path, [{"id": 1, "file_name": "big.png", "width": 200, "height": 100}], [])
    data = load_coco(tmp_path, max_pixels=10_000)
    assert data.image_ids == [] and "exceeds the limit" in data.problems[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must be an object"),
        ('{"images": [], "annotations": []}', "missing required key(s) categories"),
        ('{"images": {}, "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "'images' must be a list"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "file_name"),
        (
            '{"images": [{"id": "x", "file_name": "a"}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
            "id must be an integer",
        ),
        (
            '{"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1}], '
            '"categories": [{"id": 1, "name": "a"}]}',
            "bbox",
        ),
        ('{"images": [], "annotations": [], "categories": []}', "'categories' is empty"),
    ],
)
def test_malformed_json_raises(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "annotations.json").write_text(content)
    with pytest.raises(DatasetError) as e:
        load_coco(tmp_path)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no annotations.json"):
        load_coco(tmp_path)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    _dataset(tmp_path, [{"id": 1, "file_name": "rot.jpg", "width": 20, "height": 40}], [])
    data = load_coco(tmp_path)
    assert data.problems == [] and (data.image(1)["width"], data.image(1)["height"]) == (20, 40)
    shown = read_image(tmp_path / "rot.jpg")
    assert shown.size == (20, 40) and shown.mode == "RGB"
    assert shown.getpixel((10, 2))[2] > 200  # the left band is now at the top


def _split_data(tmp_path: Path, n: int, splits: list[str | None] | None = None):
    images = []
    for i in range(n):
        im = {"id": i + 10, "file_name": f"{i}.png", "width": 4, "height": 4}
        if splits and splits[i] is not None:
            im["split"] = splits[i]
        images.append(im)
    _dataset(tmp_path, images, [])
    return load_coco(tmp_path, check_images=False)


def test_seeded_split(tmp_path: Path) -> None:
    data = _split_data(tmp_path, 20)
    train, val = split(data, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15 and set(train) | set(val) == set(data.image_ids)
    assert split(data, 0.25, seed=1) == (train, val)
    assert split(data, 0.25, seed=2) != (train, val)
    assert split(data, 0.0, seed=1) == (data.image_ids, [])
    small = _split_data(tmp_path, 2)
    assert [len(part) for part in split(small, 0.01, seed=0)] == [1, 1]
    assert [len(part) for part in split(small, 0.99, seed=0)] == [1, 1]


def test_split_field_decides(tmp_path: Path) -> None:
    # train, val and test (Pascal VOC's image sets): test is held out, neither trained on nor validated on.
    data = _split_data(tmp_path, 6, ["train", "val", "test", None, "trainval", "VAL"])
    assert split(data, 0.5, seed=0) == ([10, 13, 14], [11, 15])
    # No val: test validates (VOC's trainval + test).
    data = _split_data(tmp_path, 4, ["trainval", "test", "train", "test"])
    assert split(data, 0.5, seed=0) == ([10, 12], [11, 13])
    # Only training splits: the seeded draw, as without the field.
    data = _split_data(tmp_path, 20, ["train"] * 20)
    assert split(data, 0.25, seed=1) == split(_split_data(tmp_path, 20), 0.25, seed=1)
    assert len(split(data, 0.25, seed=1)[1]) == 5


def test_write_coco_is_atomic_and_round_trips(tmp_path: Path) -> None:
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "é"}]}
    path = write_coco(coco, tmp_path / "sub")
    assert path == tmp_path / "sub/annotations.json"
    assert json.loads(path.read_text(encoding="utf-8")) == coco
    assert [p.name for p in path.parent.iterdir()] == ["annotations.json"]  # no temporary left behind


def test_readers_need_no_torch(tmp_path: Path) -> None:
    """The API validates uploads with these modules in a process without torch."""
    _png(tmp_path / "a.png", (8, 8))
    _dataset(tmp_path, [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}], [_ann(1, 1, [1, 1, 4, 4])])
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any 'import torch' now fails
        "import distill.data.annotations as a, distill.data.images as i, distill.data.voc, distill.data.synthetic\n"
        "import distill.data.__main__\n"
        f"d = a.load_coco({str(tmp_path)!r}); print(d.num_boxes, i.MEAN, i.STD)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1 (123.675, 116.28, 103.53) (58.395, 57.12, 57.375)"

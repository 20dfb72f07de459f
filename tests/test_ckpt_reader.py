"""The API's torch-free checkpoint reader: shapes and architecture right, nothing in the file executed."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest

from distill.ckpt_layout import describe_checkpoint
from distill.ckpt_reader import CheckpointError, read_checkpoint
from tests.shared_data import needs_shared, shared_path

FIXTURE = shared_path("fixtures/mmdet_gfl_r18_c64.pth")


@needs_shared("fixtures/mmdet_gfl_r18_c64.pth")
def test_mmdetection_fixture_architecture() -> None:
    info = describe_checkpoint(FIXTURE)
    assert info["source"] == "mmdetection"
    assert (info["depth"], info["base_width"], info["channels"], info["stacked_convs"]) == (18, 64, 64, 2)
    assert info["num_classes"] == 3 and info["reg_max"] == 16
    assert info["strides"] == [8, 16, 32, 64, 128]
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    assert info["name"] is None  # 64-channel FPN is none of the named architectures


def test_project_checkpoint_matches_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from distill.checkpoint import atomic_save, build_detector, detector_state

    model = build_detector("gfl_tiny", 2, classes=["cat", "dog"])
    path = tmp_path / "tiny.pt"
    atomic_save(detector_state(model, meta={"input_size": [128, 96]}), path)
    ck = read_checkpoint(path)
    sd = model.state_dict()
    assert set(ck.state_dict) == set(sd)
    for k, v in sd.items():  # every shape and dtype read without torch equals torch's own
        assert ck.state_dict[k].shape == tuple(v.shape), k
        assert ck.state_dict[k].dtype == str(v.dtype).removeprefix("torch."), k
    info = describe_checkpoint(path)
    assert info["name"] == "gfl_tiny" and info["source"] == "project"
    assert info["num_classes"] == 2 and info["classes"] == ["cat", "dog"]
    assert info["num_params"] == sum(v.numel() for v in sd.values())
    del torch


class _Boom:
    """Unpickling this would run os.system: the reader must never do so."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _torch_like_zip(path: Path, obj: object) -> None:
    data = pickle.dumps(obj, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")


def test_malicious_pickle_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _torch_like_zip(evil, {"state_dict": {"x": _Boom(str(marker))}, "meta": {"evil": _Boom(str(marker))}})
    with pytest.raises(CheckpointError, match="no state dict"):
        read_checkpoint(evil)
    assert not marker.exists()
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=2))
    with pytest.raises(CheckpointError):
        read_checkpoint(legacy)
    assert not marker.exists()


@needs_shared("fixtures/mmdet_gfl_r18_c64.pth")
def test_truncated_and_garbage_files_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_checkpoint(junk)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        read_checkpoint(empty)
    # The same archive with one tensor record missing: refused as truncated.
    cut = tmp_path / "cut.pt"
    with zipfile.ZipFile(FIXTURE) as src, zipfile.ZipFile(cut, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/3"):
                dst.writestr(info, src.read(info))
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(cut)


def test_neither_detector_nor_backbone_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "classifier_head.pt"
    torch.save({"fc.weight": torch.zeros(3, 4)}, path)
    with pytest.raises(CheckpointError, match="neither a detector nor a ResNet"):
        describe_checkpoint(path)


def test_wrapped_detector_keys_read_like_training_reads_them(tmp_path: Path) -> None:
    """The API and training share one prefix rule: a distiller's ``student.`` wrapper (and its teacher's
    keys beside it) reads as the student's detector in both."""
    torch = pytest.importorskip("torch")
    from distill.checkpoint import build_detector, load_detector

    model = build_detector("gfl_tiny", 2, ["a", "b"])
    other = build_detector("gfl_small", 5)
    sd = {f"student.{k}": v for k, v in model.state_dict().items()}
    sd.update({f"teacher.{k}": v for k, v in other.state_dict().items()})
    path = tmp_path / "distiller.pth"
    torch.save({"state_dict": sd, "meta": {"dataset_meta": {"classes": ["a", "b"]}}}, path)
    info = describe_checkpoint(path)
    assert info["kind"] == "detector" and info["name"] == "gfl_tiny" and info["classes"] == ["a", "b"]
    loaded = load_detector(path)
    assert loaded.arch == "gfl_tiny" and loaded.cfg.classes == ["a", "b"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_legacy_format_read(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "legacy.pt"
    sd = {"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.arange(5)}
    torch.save({"state_dict": sd, "meta": {"classes": ["x"]}}, path, _use_new_zipfile_serialization=False)
    ck = read_checkpoint(path)
    assert ck.format == "legacy"
    assert ck.state_dict["a"].shape == (2, 3) and ck.state_dict["a"].dtype == "float16"
    assert ck.state_dict["b"].shape == (5,) and ck.state_dict["b"].dtype == "int64"
    assert ck.meta["classes"] == ["x"]

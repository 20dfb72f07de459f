"""The model registry: atomic publishing, listing, sha256 checks. Torch-free, on a hand-built ONNX graph."""

from __future__ import annotations

import os
import threading
import time

import onnx
import pytest
from onnx import TensorProto, helper

from deploy.registry import (
    RUNTIME_KEYS,
    ModelIntegrityError,
    Registry,
    build_model_json,
    read_model_json,
    write_model_json,
)


def make_export(folder, value: float = 1.0):
    """A folder as ``deploy.export`` leaves it: a (tiny) model.onnx and its model.json."""
    folder.mkdir(parents=True)
    node = helper.make_node("Add", ["x", "c"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("c", TensorProto.FLOAT, [1], [value])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    info = build_model_json(
        folder / "model.onnx", classes=["a", "b"], input_size=[320, 256], mean=[0, 0, 0], std=[1, 1, 1]
    )
    # A description key that has no place in a published folder (the store keeps it).
    write_model_json(folder, {**info, "metrics": {"AP": value}})
    return folder


def test_publish_get_list_verify(tmp_path):
    registry = Registry(tmp_path / "models")
    first = registry.publish(make_export(tmp_path / "e1", 1.0), model_id="mdl_one")
    time.sleep(0.01)
    second = registry.publish(make_export(tmp_path / "e2", 2.0))
    assert first["id"] == "mdl_one" and second["id"].startswith("mdl_")
    assert [m["id"] for m in registry.list()] == [second["id"], "mdl_one"]  # newest first
    got = registry.get("mdl_one")
    assert got == read_model_json(registry.path("mdl_one")) == first
    # model.json holds what the runtime needs, nothing more.
    # precision and cpu_features are written only for a format that needs them (bf16), not for fp32.
    assert set(got) == set(RUNTIME_KEYS) - {"precision", "cpu_features"}
    assert got["classes"] == ["a", "b"] and got["input_size"] == [320, 256]
    assert got["sha256"] == read_model_json(tmp_path / "e1")["sha256"]
    assert (registry.path("mdl_one") / "model.onnx").read_bytes() == (tmp_path / "e1" / "model.onnx").read_bytes()
    assert registry.verify("mdl_one")["sha256"] == first["sha256"]
    assert registry.latest()["id"] == second["id"]


def test_unknown_and_malformed_ids(tmp_path):
    registry = Registry(tmp_path / "models")
    with pytest.raises(KeyError):
        registry.get("mdl_missing")
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(KeyError):
            registry.path(bad)
        with pytest.raises(ValueError, match="invalid model id"):
            registry.publish(make_export(tmp_path / f"e{len(bad)}{bad.count('.')}", 1.0), model_id=bad)


def test_duplicate_id_is_refused(tmp_path):
    registry = Registry(tmp_path / "models")
    registry.publish(make_export(tmp_path / "e1", 1.0), model_id="mdl_x")
    with pytest.raises(FileExistsError):
        registry.publish(make_export(tmp_path / "e2", 2.0), model_id="mdl_x")
    assert registry.verify("mdl_x")["sha256"] == read_model_json(tmp_path / "e1")["sha256"]


def test_concurrent_publishers_of_one_id_one_wins(tmp_path):
    registry = Registry(tmp_path / "models")
    sources = [make_export(tmp_path / f"e{i}", float(i)) for i in range(6)]
    outcomes: list[str] = []

    def publish(src):
        try:
            registry.publish(src, model_id="mdl_race")
            outcomes.append("ok")
        except FileExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=publish, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["exists"] * 5 + ["ok"]
    registry.verify("mdl_race")
    assert sorted(os.listdir(registry.root)) == ["mdl_race"]  # no temporary folders left


def test_a_failed_publish_leaves_nothing_visible(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "models")
    src = make_export(tmp_path / "e1", 1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        registry.publish(src, model_id="mdl_half")
    monkeypatch.undo()
    assert registry.list() == [] and os.listdir(registry.root) == []
    with pytest.raises(KeyError):
        registry.get("mdl_half")


def test_tampered_model_is_refused(tmp_path):
    registry = Registry(tmp_path / "models")
    registry.publish(make_export(tmp_path / "e1", 1.0), model_id="mdl_t")
    path = registry.path("mdl_t") / "model.onnx"
    registry.verify("mdl_t")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="does not match"):
        registry.verify("mdl_t")
    path.unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        registry.verify("mdl_t")


def test_source_damaged_before_publishing_is_refused(tmp_path):
    src = make_export(tmp_path / "e1", 1.0)
    (src / "model.onnx").write_bytes(b"garbage")
    registry = Registry(tmp_path / "models")
    with pytest.raises(ModelIntegrityError):
        registry.publish(src)
    assert os.listdir(registry.root) == []


def test_a_publish_killed_mid_copy_leaves_nothing_after_the_next_attempt(tmp_path):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    registry = Registry(tmp_path / "models")
    dead = tmp_path / "models" / f".tmp-mdl_job1-{gone.pid}-0badc0de"  # what a SIGKILLed publisher leaves
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"half a model")
    racing = tmp_path / "models" / f".tmp-mdl_job1-{os.getpid()}-12345678"  # a live publisher of the same id
    racing.mkdir()
    other = tmp_path / "models" / f".tmp-mdl_job2-{gone.pid}-12345678"  # another id's: not this publish's business
    other.mkdir()
    registry.publish(make_export(tmp_path / "e1"), model_id="mdl_job1")
    assert not dead.exists() and racing.exists() and other.exists()
    assert [m["id"] for m in registry.list()] == ["mdl_job1"]

"""The one job check (``core.checks``) against a real store: what it refuses and why, and the local spec it
resolves for the training child. Torch-free except where a real checkpoint file is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.artifacts import checkpoint_key, dataset_key, model_key
from core.checks import JobRefused, check_job, resolve_job, weights_cache_dir
from core.settings import Settings
from core.store import Store
from distill.spec import JobSpec, LocalJobSpec

DS = "ds_00000000000000d1"
CK = "ck_0000000000000c01"


@pytest.fixture
def env(tmp_path):
    settings = Settings(data_dir=tmp_path / "ldd", weights_dir=tmp_path / "weights")
    settings.make_dirs()
    store = Store(settings.store_url)
    ds = settings.datasets_dir / DS
    ds.mkdir()
    store.add_dataset(DS, "d", dataset_key(DS), ["cat", "dog"], 3, 4, {"train": 2, "val": 1}, [])
    yield settings, store
    store.close()


def _checkpoint(settings: Settings, store: Store, id: str, facts: dict) -> Path:
    path = settings.checkpoints_dir / f"{id}.pt"
    path.write_bytes(b"weights")
    store.add_checkpoint(id, checkpoint_key(id), facts, "t")
    return path


TINY_DETECTOR = {
    "kind": "detector",
    "depth": 18,
    "base_width": 16,
    "channels": 32,
    "stacked_convs": 2,
    "reg_max": 16,
    "strides": [8, 16, 32, 64, 128],
    "num_classes": 80,
    "classes": ["Cat", "person"],
}


def test_resolve_train_and_distill(env):
    settings, store = env
    local = resolve_job({"kind": "train", "dataset": DS, "student": {"arch": "gfl_tiny"}}, store, settings)
    assert local["dataset"] == str(settings.datasets_dir / DS) and local["student"]["arch"] == "gfl_tiny"
    LocalJobSpec.model_validate(local)  # what the child reads

    ckpt = _checkpoint(settings, store, CK, TINY_DETECTOR)  # 80 classes: LD needs none, KD maps by name
    spec = {"kind": "distill", "dataset": DS, "teacher": {"checkpoint": CK}}
    local = resolve_job(spec, store, settings)
    assert local["teacher"] == {"path": str(ckpt)} and local["distill"]["tau"] > 0
    assert LocalJobSpec.model_validate(local).teacher.path == str(ckpt)

    # A teacher given by the job that trained it, and by the model that job published.
    job, _ = store.create_job({"kind": "train", "dataset": DS})
    store.claim(job["id"], "w", 30)
    with pytest.raises(JobRefused, match="running, not succeeded"):
        resolve_job({**spec, "teacher": {"job": job["id"]}}, store, settings)
    torch = pytest.importorskip("torch")  # the teacher's facts are read from its real checkpoint file
    from distill.checkpoint import atomic_save, build_detector, detector_state

    run = settings.run_dir(job["id"])
    atomic_save(detector_state(build_detector("gfl_tiny", 2, ["cat", "dog"])), run / "model.pt")
    assert torch is not None
    mdl = "mdl_" + job["id"].removeprefix("job_")
    store.finish(job["id"], "w", "succeeded", model_id=mdl)
    store.add_model(mdl, job["id"], model_key(mdl), {"classes": ["cat", "dog"]})
    for teacher in ({"job": job["id"]}, {"model": mdl}):
        assert resolve_job({**spec, "teacher": teacher}, store, settings)["teacher"]["path"] == str(run / "model.pt")


def test_init_checkpoint_resolves_to_its_file(env):
    settings, store = env
    path = _checkpoint(settings, store, CK, {"kind": "backbone", "depth": 18, "base_width": 16})
    local = resolve_job(
        {"kind": "train", "dataset": DS, "student": {"arch": "gfl_tiny", "init": {"checkpoint": CK}}}, store, settings
    )
    assert local["student"]["init"] == {"path": str(path)}


@pytest.mark.parametrize(
    "spec, code, message",
    [
        ({"kind": "train", "dataset": "ds_00000000000000ff"}, "unknown_dataset", "no dataset 'ds_00000000000000ff'"),
        (
            {"kind": "distill", "dataset": DS, "teacher": {"model": "mdl_000000000000dead"}},
            "invalid_teacher",
            "no model",
        ),
        ({"kind": "distill", "dataset": DS, "teacher": {"job": "job_000000000000dead"}}, "invalid_teacher", "no job"),
        (
            {"kind": "distill", "dataset": DS, "teacher": {"checkpoint": "ck_000000000000dead"}},
            "invalid_teacher",
            "no checkpoint",
        ),
        (
            {
                "kind": "train",
                "dataset": DS,
                "student": {"arch": "gfl_tiny", "init": {"checkpoint": "ck_00000000dead"}},
            },
            "unknown_checkpoint",
            "no checkpoint",
        ),
    ],
)
def test_unknown_ids_refused(env, spec, code, message):
    settings, store = env
    with pytest.raises(JobRefused, match=message) as e:
        check_job(JobSpec.model_validate(spec), store, settings)
    assert e.value.code == code and e.value.status == 404  # as a GET of the id (issue 15)


def test_teacher_must_share_reg_max_and_strides_not_classes(env):
    settings, store = env
    spec = JobSpec.model_validate({"kind": "distill", "dataset": DS, "teacher": {"checkpoint": CK}})
    _checkpoint(settings, store, CK, TINY_DETECTOR)
    assert check_job(spec, store, settings).teacher_facts["num_classes"] == 80
    refusals = (({"reg_max": 7}, "reg_max 7 differs from the student's 16"), ({"strides": [8, 16, 32]}, "strides"))
    for bad, text in refusals:
        store2 = Store(f"sqlite:///{settings.data_dir / (text[:3] + '.db')}")
        store2.add_dataset(DS, "d", dataset_key(DS), ["cat"], 1, 1, {}, [])
        _checkpoint(settings, store2, CK, {**TINY_DETECTOR, **bad})
        with pytest.raises(JobRefused, match=text) as e:
            check_job(spec, store2, settings)
        assert e.value.code == "teacher_mismatch"
        store2.close()


def test_backbone_teacher_and_misfit_init_refused(env):
    settings, store = env
    _checkpoint(settings, store, CK, {"kind": "backbone", "depth": 50, "base_width": 64})
    with pytest.raises(JobRefused, match="is a backbone, not a GFL detector"):
        check_job(
            JobSpec.model_validate({"kind": "distill", "dataset": DS, "teacher": {"checkpoint": CK}}), store, settings
        )
    with pytest.raises(JobRefused, match="ResNet-50 of width 64; gfl_r18 has ResNet-18") as e:
        check_job(
            JobSpec.model_validate(
                {"kind": "train", "dataset": DS, "student": {"arch": "gfl_r18", "init": {"checkpoint": CK}}}
            ),
            store,
            settings,
        )
    assert e.value.code == "invalid_init"


def test_class_map_names_must_exist(env):
    settings, store = env
    _checkpoint(settings, store, CK, TINY_DETECTOR)
    base = {"kind": "distill", "dataset": DS, "teacher": {"checkpoint": CK}}
    ok = JobSpec.model_validate({**base, "distill": {"class_map": {"dog": "person"}}})
    check_job(ok, store, settings)
    for cmap, text in (({"bird": "person"}, "'bird'"), ({"dog": "horse"}, "'horse'")):
        with pytest.raises(JobRefused, match=text) as e:
            check_job(JobSpec.model_validate({**base, "distill": {"class_map": cmap}}), store, settings)
        assert e.value.code == "invalid_class_map"


def test_imagenet_weights_cached_or_refused_with_file_and_folder(env, monkeypatch):
    settings, store = env
    # Offline as a machine without internet is: every connection goes to a proxy that refuses it.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    spec = JobSpec.model_validate({"kind": "train", "dataset": DS, "student": {"arch": "gfl_r18", "init": "imagenet"}})
    with pytest.raises(JobRefused) as e:
        check_job(spec, store, settings)
    assert e.value.code == "weights_missing" and "resnet18-f37072fd.pth" in e.value.message
    assert str(settings.weights_dir) in e.value.message
    (settings.weights_dir).mkdir()
    (settings.weights_dir / "resnet18-f37072fd.pth").write_bytes(b"cached")
    check_job(spec, store, settings)  # cached: accepted without the network
    assert resolve_job(spec.model_dump(mode="json"), store, settings)["student"]["init"] == "imagenet"


def test_weights_cache_dir_follows_torch_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert weights_cache_dir(None) == tmp_path / "th" / "hub" / "checkpoints"
    assert weights_cache_dir(tmp_path / "w") == tmp_path / "w"
    torch_hub = pytest.importorskip("torch.hub")
    assert Path(torch_hub.get_dir()) / "checkpoints" == weights_cache_dir(None)


def test_crosskd_layer_outside_the_towers_refused(env):
    settings, store = env
    _checkpoint(
        settings,
        store,
        CK,
        {**TINY_DETECTOR, "base_width": 32, "channels": 64, "stacked_convs": 4, "num_classes": 1, "classes": ["cat"]},
    )

    def job(layer: int) -> JobSpec:
        return JobSpec.model_validate(
            {
                "kind": "distill",
                "dataset": DS,
                "student": {"arch": "gfl_tiny"},
                "teacher": {"checkpoint": CK},
                "distill": {"method": "crosskd", "crosskd_layer": layer},
            }
        )

    check_job(job(2), store, settings)  # gfl_tiny has 2 stacked convs, the teacher 4
    with pytest.raises(JobRefused) as e:
        check_job(job(3), store, settings)
    assert e.value.status == 422 and e.value.code == "invalid_crosskd_layer"
    assert "distill.crosskd_layer 3" in e.value.message and "[0, 2]" in e.value.message
    with pytest.raises(ValueError, match="crosskd_layer"):
        job(-1)


def test_teacher_cache_on_refused_where_it_cannot_apply(env):
    settings, store = env
    _checkpoint(settings, store, CK, {**TINY_DETECTOR, "num_classes": 1, "classes": ["cat"]})
    spec = JobSpec.model_validate(
        {
            "kind": "distill",
            "dataset": DS,
            "teacher": {"checkpoint": CK},
            "student": {"arch": "gfl_tiny"},
            "distill": {"teacher_cache": "on", "weights": {"crosskd_cls": 1.0}},
        }
    )
    with pytest.raises(JobRefused, match="CrossKD") as refused:
        check_job(spec, store, settings)
    assert refused.value.status == 422 and refused.value.code == "invalid_teacher_cache"

"""bf16 (``deploy.precision``): an export in fp32 and bf16 records the CPU features bf16 needs in its model.json,
serves it with OpenVINO in bf16 close to fp32, and a CPU without those features (simulated by the recorded list,
and by an AVX2-only flag set) refuses to load it with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from deploy.precision import CPU_FEATURES, PrecisionUnavailable, check_cpu, cpu_flags
from tests.api_server import png_bytes
from tests.isolation import in_own_process

pytestmark = in_own_process(__file__)


def test_a_cpu_without_the_features_refuses_bf16() -> None:
    meta = {"precision": "bf16", "cpu_features": list(CPU_FEATURES["bf16"])}
    with pytest.raises(PrecisionUnavailable, match=r"lacks \['avx512_bf16'\].*serve its fp32 model instead"):
        check_cpu(meta, frozenset({"avx2", "fma", "avx512f"}))  # an AVX2/AVX-512 CPU without bf16
    check_cpu(meta, frozenset({"avx2", "avx512_bf16"}))
    check_cpu({"classes": ["a"]}, frozenset())  # fp32 needs nothing


def test_bf16_export_records_its_features_and_serves_close_to_fp32(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("openvino")
    if not set(CPU_FEATURES["bf16"]) <= cpu_flags():
        pytest.skip(f"this CPU has no {CPU_FEATURES['bf16']}: bf16 is refused here (the test above)")
    from deploy.export import export_model
    from deploy.runtime import Predictor
    from distill.checkpoint import atomic_save, build_detector, detector_state

    torch.manual_seed(0)  # the same random detector whatever ran before: the bound below was measured on it
    model = build_detector("gfl_tiny", 2, classes=["a", "b"])
    with torch.no_grad():
        model.bbox_head.gfl_cls.bias.fill_(2.0)
    atomic_save(detector_state(model, meta={"input_size": [128, 96]}), tmp_path / "model.pt")
    description = export_model(tmp_path / "model.pt", tmp_path / "out", formats=["fp32", "bf16"])
    bf16 = description["variants"]["bf16"]
    assert bf16["precision"] == "bf16" and bf16["cpu_features"] == ["avx512_bf16"]
    assert bf16["export"]["bf16"]["inference_precision"] == "bf16"
    check = bf16["export"]["verification"]
    assert check["matched"] >= 0.9 * check["reference"] > 0, check
    recorded = json.loads((tmp_path / "out" / "bf16" / "model.json").read_text())
    assert (recorded["precision"], recorded["cpu_features"]) == ("bf16", ["avx512_bf16"])

    served = Predictor(tmp_path / "out" / "bf16")  # asked for ONNX Runtime: bf16 runs on OpenVINO
    assert served.backend == "openvino"
    image = png_bytes((200, 150))
    ours, fp32 = served.predict([image])[0], Predictor(tmp_path / "out").predict([image])[0]
    assert abs(len(ours) - len(fp32)) <= max(2, len(fp32) // 10)
    best = max(fp32, key=lambda d: d["score"])
    near = [
        d
        for d in ours
        if d["label"] == best["label"] and max(abs(a - b) for a, b in zip(d["box"], best["box"], strict=True)) < 2
    ]
    assert near and abs(near[0]["score"] - best["score"]) < 0.02

    # The recorded list is what a server checks: one feature this CPU lacks and the model is refused.
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "out" / "bf16", other)
    (other / "model.json").write_text(json.dumps({**recorded, "cpu_features": ["avx512_bf16", "amx_simulated"]}))
    with pytest.raises(PrecisionUnavailable, match=r"lacks \['amx_simulated'\]"):
        Predictor(other)


def test_the_api_refuses_a_bf16_model_this_cpu_cannot_run_with_the_reason(tmp_path: Path) -> None:
    """Over HTTP (uvicorn without torch): a published bf16 model whose recorded features this CPU lacks answers
    503 with the reason, and its fp32 sibling still serves."""
    pytest.importorskip("torch")
    from core.store import Store
    from deploy.registry import Registry, read_model_json, write_model_json
    from tests.api_server import error_of, publish_test_model, serve_api

    srv = serve_api(tmp_path / "srv")
    try:
        fp32 = publish_test_model(srv.data_dir, srv.store_url, ["a", "b"], "mdl_bf16test0001")  # type: ignore[attr-defined]
        folder = tmp_path / "bf16"
        shutil.copytree(Registry(srv.data_dir / "models").path(fp32["id"]), folder)  # type: ignore[attr-defined]
        info = read_model_json(folder)
        write_model_json(folder, {**info, "id": None, "precision": "bf16", "cpu_features": ["avx512_simulated"]})
        Registry(srv.data_dir / "models").publish(folder, model_id="mdl_bf16test0001bf16")  # type: ignore[attr-defined]
        store = Store(srv.store_url)  # type: ignore[attr-defined]
        store.add_model("mdl_bf16test0001bf16", None, "models/mdl_bf16test0001bf16",
                        {"classes": ["a", "b"], "precision": "bf16", "cpu_features": ["avx512_simulated"]},
                        format="bf16", fp32_id=fp32["id"])  # fmt: skip
        store.close()
        image = {"file": ("x.png", png_bytes((96, 64)), "image/png")}
        r = httpx.post(srv.url + "/v1/models/mdl_bf16test0001bf16/detect", files=image, timeout=60)
        assert r.status_code == 503 and error_of(r)["code"] == "model_unavailable"
        assert "lacks ['avx512_simulated']" in error_of(r)["message"]
        got = httpx.get(srv.url + "/v1/models/mdl_bf16test0001bf16").json()
        assert got["cpu_features"] == ["avx512_simulated"] and got["serving"]["backend"] == "openvino"
        assert httpx.post(srv.url + f"/v1/models/{fp32['id']}/detect", files=image, timeout=60).status_code == 200
    finally:
        srv.stop()


def test_bf16_keeps_the_ap_of_fp32_within_one_point(tmp_path: Path) -> None:
    """AP of the fp32 and bf16 models on a data set whose ground truth is the PyTorch model's own confident
    detections (``tests.test_quantize``), each measured by the runtime that serves it, as export does."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("openvino")
    if not set(CPU_FEATURES["bf16"]) <= cpu_flags():
        pytest.skip(f"this CPU has no {CPU_FEATURES['bf16']}")
    from deploy.export import export_model
    from distill.checkpoint import detector_state
    from tests.test_deploy_export import INPUT_SIZE
    from tests.test_quantize import confident_detector, make_dataset

    model = confident_detector()
    torch.save(detector_state(model, {"input_size": list(INPUT_SIZE)}), tmp_path / "tiny.pt")
    dataset = make_dataset(tmp_path / "data", model)
    made = export_model(tmp_path / "tiny.pt", tmp_path / "model", formats=["bf16"], dataset=dataset)
    fp32, bf16 = made["metrics"], made["variants"]["bf16"]["metrics"]
    assert bf16["backend"] == "openvino" and fp32["AP"] > 0.5, (fp32, bf16)
    assert abs(100 * (fp32["AP"] - bf16["AP"])) <= 1.0, (fp32["AP"], bf16["AP"])
    assert made["variants"]["bf16"]["accuracy_warning"] is None

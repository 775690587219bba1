"""Pretrained weights: local files in each source format, checksums, offline errors, downloads."""

import dataclasses
import functools
import hashlib
import http.server
import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from facecls.cli import main
from facecls.core.errors import FaceclsError
from facecls.models.inception_resnet_v1 import InceptionResnetV1
from facecls.models.registry import create_model, get_weight_spec
from facecls.models.weights import load_backbone_weights, read_state_dict, resolve_weights_file


def _facenet_file(path):
    """A facenet-pytorch style file: a plain state dict with VGGFace2's 8,631-way logits."""
    torch.manual_seed(0)
    torch.save(InceptionResnetV1(num_classes=8631, classify=True).state_dict(), path)
    return path


def test_facenet_format_file_loads_and_drops_the_source_head(tmp_path):
    path = _facenet_file(tmp_path / "20180402-114759-vggface2.pt")
    state = read_state_dict(path)
    model = create_model("inception_resnet_v1", 5)
    report = load_backbone_weights(model.backbone, state, str(path), "x")
    assert sorted(report.ignored) == ["logits.bias", "logits.weight"]
    assert not report.missing
    assert torch.equal(model.backbone.last_linear.weight, state["last_linear.weight"])


def test_torchvision_format_and_safetensors_load(tmp_path):
    from torchvision.models import mobilenet_v2

    source = mobilenet_v2(weights=None).state_dict()
    torch.save(source, tmp_path / "mnv2.pth")
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "mnv2.safetensors"))
    for name in ("mnv2.pth", "mnv2.safetensors"):
        model = create_model("mobilenet_v2", 3)
        report = load_backbone_weights(model.backbone, read_state_dict(tmp_path / name), name, "x")
        assert set(report.ignored) == {"classifier.1.weight", "classifier.1.bias"}
        assert torch.equal(model.backbone.features[0][0].weight, source["features.0.0.weight"])


def test_wrong_model_file_is_refused(tmp_path):
    from torchvision.models import mobilenet_v2

    torch.save(mobilenet_v2(weights=None).state_dict(), tmp_path / "m.pth")
    model = create_model("resnet50", 3)
    with pytest.raises(FaceclsError, match="do not fit this backbone"):
        load_backbone_weights(model.backbone, read_state_dict(tmp_path / "m.pth"), "m.pth", "x")


def test_checksum_mismatch_is_refused(tmp_path):
    path = _facenet_file(tmp_path / "w.pt")
    spec = get_weight_spec("inception_resnet_v1", "vggface2")
    with pytest.raises(FaceclsError, match="SHA-256"):
        resolve_weights_file(spec, str(path), sha256="0" * 64)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert resolve_weights_file(spec, str(path), sha256=good) == path


def test_offline_and_missing_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = get_weight_spec("inception_resnet_v1", "vggface2")
    with pytest.raises(FaceclsError) as info:
        resolve_weights_file(spec, offline=True)
    message = str(info.value)
    assert spec.url in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message


def test_download_into_torch_hub_cache_from_local_server(tmp_path, monkeypatch):
    monkeypatch.delenv("FACECLS_OFFLINE", raising=False)  # this test downloads (from 127.0.0.1)
    served = tmp_path / "served"
    served.mkdir()
    path = _facenet_file(served / "20180402-114759-vggface2.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        base = get_weight_spec("inception_resnet_v1", "vggface2")
        url = f"http://127.0.0.1:{server.server_address[1]}/{base.file_name}"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        spec = dataclasses.replace(base, url=url, sha256=digest)
        got = resolve_weights_file(spec)
        assert got == tmp_path / "torch" / "hub" / "checkpoints" / base.file_name
        assert got.read_bytes() == path.read_bytes()
        bad = dataclasses.replace(spec, file_name="other.pt", url=url, sha256="1" * 64)
        with pytest.raises(FaceclsError, match="SHA-256|sha256|checksum"):
            resolve_weights_file(bad)
        assert not (tmp_path / "torch" / "hub" / "checkpoints" / "other.pt").exists()
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_cli_offline_missing_weights_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = tmp_path / "data" / "train"
    for ident in ("a", "b"):
        (data / ident).mkdir(parents=True)
        from PIL import Image

        for i in range(3):
            Image.new("RGB", (90, 90), (i * 40, 10, 10)).save(data / ident / f"{i}.png")
    code = main(
        [
            "train",
            "--recipe",
            "inception_resnet_v1",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--offline",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("facecls: error:") and "20180402-114759-vggface2.pt" in err[-1]


@pytest.mark.slow
def test_sface_pretrained_beats_random_init_on_real_faces(five_celebrity_aligned, tmp_path):
    """Fine-tuning the face-pretrained SFace vs the same recipe from random initialisation, on aligned
    in-the-wild photos of 5 people."""
    data = tmp_path / "celeb" / "train"
    shutil.copytree(five_celebrity_aligned, data)
    results = {}
    for weights in ("opencv-zoo-int8bq", "none"):
        run = tmp_path / f"run-{weights}"
        assert (
            main(
                [
                    "train",
                    "--recipe",
                    "sface",
                    "--data",
                    str(data.parent),
                    "--out",
                    str(run),
                    "--no-progress",
                    "--set",
                    f"model.weights={weights}",
                    "--set",
                    "train.epochs=2",
                    "--set",
                    "train.frozen_epochs=1",
                    "--set",
                    "train.batch_size=16",
                    "--set",
                    "data.split=[0.667,0.167,0.166]",
                ]
            )
            == 0
        )
        results[weights] = json.loads((run / "eval_test.json").read_text())["top1"]
        info = json.loads((run / "run.json").read_text())
        if weights != "none":
            assert len(info["weights"]["sha256"]) == 64
    print(
        f"five celebrities (aligned) test top-1: sface pretrained {results['opencv-zoo-int8bq']:.3f}, "
        f"random init {results['none']:.3f}"
    )
    assert results["opencv-zoo-int8bq"] >= results["none"] + 0.3

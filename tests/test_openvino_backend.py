"""The OpenVINO inference backend: the same outputs as PyTorch, the choice `auto` makes, and no crash under
the jemalloc the `facecls` command preloads."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from facecls.config import HeadConfig, SpeedConfig
from facecls.core.errors import FaceclsError
from facecls.engine.inference import inference_model
from facecls.models.registry import create_model
from facecls.runtime import openvino_backend
from facecls.runtime.allocator import JEMALLOC_PATHS
from facecls.runtime.openvino_backend import OPENVINO_MIN_IMAGES, OpenVinoModule, use_openvino
from facecls.runtime.speed import resolve_runtime

pytest.importorskip("openvino")

SIZE = 64


def _fp32_runtime(backend: str):
    return resolve_runtime(SpeedConfig(precision="fp32", inference_backend=backend), "cpu")


def test_backbone_through_openvino_matches_pytorch_at_any_batch_size():
    torch.manual_seed(0)
    backbone = create_model("mobilenet_v2", 5).backbone.eval()
    converted = OpenVinoModule(backbone, SIZE, "fp32", torch.get_num_threads())
    for batch in (1, 3, 7):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            expected = backbone(x)
        got = converted(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_a_classifier_keeps_its_head_in_pytorch_and_the_callers_model_is_untouched():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 5, HeadConfig(kind="nearest_mean")).eval()
    model.flip_tta = True  # the doubled batch goes through the converted backbone
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
    through = inference_model(model, _fp32_runtime("openvino"), SIZE, images=4)
    assert isinstance(through.backbone, OpenVinoModule)
    assert not isinstance(model.backbone, OpenVinoModule)
    assert through.head is model.head
    with torch.no_grad():
        got = through(x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_auto_picks_openvino_only_where_it_was_measured_faster(monkeypatch):
    def kind(name):
        monkeypatch.setattr(openvino_backend, "cpu_info", lambda: {"kind": name})

    kind("amx")
    assert use_openvino("auto", "cpu", OPENVINO_MIN_IMAGES)
    assert not use_openvino("auto", "cpu", OPENVINO_MIN_IMAGES - 1)  # conversion would cost what it saves
    assert not use_openvino("auto", "cuda", 10**6)
    assert not use_openvino("torch", "cpu", 10**6)
    kind("avx512_bf16")  # not measured there: PyTorch
    assert not use_openvino("auto", "cpu", 10**6)
    assert use_openvino("openvino", "cpu", 1)  # asked for: whatever the CPU
    with pytest.raises(FaceclsError, match="runs on the CPU"):
        use_openvino("openvino", "cuda:0", 1)
    monkeypatch.setattr(openvino_backend, "openvino_installed", lambda: False)
    kind("amx")
    assert not use_openvino("auto", "cpu", 10**6)
    with pytest.raises(FaceclsError, match=r"pip install \"facecls\[openvino\]\""):
        use_openvino("openvino", "cpu", 1)


def test_auto_falls_back_to_pytorch_when_conversion_fails_and_a_named_backend_says_so(monkeypatch, capsys):
    from facecls.core.console import Console
    from facecls.engine import inference

    def refuse(*args, **kwargs):
        raise FaceclsError("OpenVINO could not convert the model: no such op")

    monkeypatch.setattr(inference, "use_openvino", lambda *args: True)
    monkeypatch.setattr(inference, "OpenVinoModule", refuse)
    model = create_model("mobilenet_v2", 5).eval()
    fallback = inference_model(model, _fp32_runtime("auto"), SIZE, images=10, console=Console(progress=False))
    assert not isinstance(fallback.backbone, OpenVinoModule)
    assert "could not convert the model: no such op; running it in PyTorch" in capsys.readouterr().err
    with pytest.raises(FaceclsError, match="could not convert"):
        inference_model(model, _fp32_runtime("openvino"), SIZE, images=1)


def test_unknown_backend_in_a_recipe_is_refused():
    with pytest.raises(ValueError, match="inference_backend"):
        SpeedConfig(inference_backend="tensorrt")
    assert replace(_fp32_runtime("torch"), inference_backend="openvino").inference_backend == "openvino"


@pytest.mark.skipif(not any(os.path.exists(p) for p in JEMALLOC_PATHS), reason="jemalloc is not installed")
def test_openvino_runs_under_the_jemalloc_the_command_preloads():
    """Without facecls's work-around, OpenVINO's hwloc frees jemalloc's memory with glibc's free() and the
    process aborts ("free(): invalid pointer") while compiling."""
    lib = next(p for p in JEMALLOC_PATHS if os.path.exists(p))
    code = (
        "import torch\n"
        "from facecls.models.registry import create_model\n"
        "from facecls.runtime.openvino_backend import OpenVinoModule\n"
        "m = create_model('mobilenet_v2', 3).backbone.eval()\n"
        f"print(tuple(OpenVinoModule(m, {SIZE}, 'bf16', 1)(torch.zeros(2, 3, {SIZE}, {SIZE})).shape))\n"
    )
    env = {**os.environ, "LD_PRELOAD": lib}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(2, 1280)"

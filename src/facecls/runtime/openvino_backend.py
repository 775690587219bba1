"""Prediction and embedding through OpenVINO, where it is faster than PyTorch on the CPU at hand.

Measured on a 2-core Xeon with AMX (benchmarks/RESULTS.md, ``benchmarks/inference_backends.py``): OpenVINO's
CPU plugin in bf16 ran the models 1.7x (SFace) to 2.7x (MobileNetV2) faster than facecls's own PyTorch path
(bf16 autocast, channels_last, BatchNorm folded) on the same batches, with the same labels, and 1.0-1.4x
faster than that path compiled by inductor, after 2-4x less set-up. It fuses convolution, BatchNorm and
activation into one AMX kernel, which PyTorch's eager mode does not. Only the backbone is converted
(``ov.convert_model``, 1.4-4 s): heads stay in PyTorch, so every head kind works, and flip TTA's doubled
batch is just a larger batch (the converted model takes any batch size).

The choice is ``speed.inference_backend`` (``--backend`` on predict, embed, verify and enrol): ``torch``,
``openvino``, or ``auto``: OpenVINO when it is installed (``pip install "facecls[openvino]"``), the device is
the CPU, the CPU has AMX and the job has at least OPENVINO_MIN_IMAGES images (below that the conversion costs
about what it saves). On a 2-core AVX2-only EPYC (no bf16 in hardware, so fp32 on both sides) OpenVINO was
only 1.01x (ResNet-50) to 1.19x (SFace) faster than PyTorch eager, after 5-12 s of conversion: PyTorch
stays the choice there; on a 2-core Ice Lake Xeon (AVX-512 without bf16, fp32) 1.06-1.30x eager after 2-5 s
and 0.93-1.10x what ``predict`` compiles from 5,000 images, so PyTorch there too. On a 2-core AVX512-BF16
EPYC (bf16 on both sides, no AMX) the model alone ran 1.01x (SFace) to 1.49x (MobileNetV2) faster than
PyTorch eager and 0.87-1.03x compiled, and ``facecls embed --model sface`` over 2,259 faces took 26.0-26.3 s
against PyTorch's 24.4 s: PyTorch there too."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from facecls.core.errors import FaceclsError, first_line
from facecls.runtime.allocator import jemalloc_loaded
from facecls.runtime.machine import cpu_info

OPENVINO_MIN_IMAGES = 1000
"""Conversion takes 1.4-3.9 s and saves 0.8 (MobileNetV2 at 112 px) to 8.3 ms (ResNet-50 at 224 px) per image
and view: about break-even here for the small models, a clear gain for the large ones."""


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def use_openvino(backend: str, device: str, images: int) -> bool:
    """Whether inference on ``images`` images goes through OpenVINO under ``backend`` (see the module)."""
    if backend == "torch":
        return False
    if backend == "openvino":
        if device != "cpu":
            raise FaceclsError(f"the OpenVINO backend runs on the CPU, not {device}; use --backend torch there")
        if not openvino_installed():
            raise FaceclsError('the OpenVINO backend needs openvino: pip install "facecls[openvino]"')
        return True
    return device == "cpu" and openvino_installed() and cpu_info()["kind"] == "amx" and images >= OPENVINO_MIN_IMAGES


def _import_openvino():
    """``openvino``, made safe under a preloaded jemalloc (the ``facecls`` command's allocator).

    TBB, which OpenVINO runs on, opens its topology helper with RTLD_DEEPBIND, so the hwloc library under it
    binds glibc's free() and aborts the process when it frees jemalloc's memory ("free(): invalid pointer").
    Loading hwloc first, globally, binds it to the process's allocator like everything else; TBB then
    reuses that copy."""
    spec = importlib.util.find_spec("openvino")
    if jemalloc_loaded() and spec is not None and spec.origin is not None:
        for hwloc in sorted((Path(spec.origin).parent / "libs").glob("libhwloc.so*")):
            ctypes.CDLL(str(hwloc), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            break
    import openvino

    return openvino


class OpenVinoModule(nn.Module):
    """``module`` (images N x 3 x S x S -> one tensor) compiled by OpenVINO for the CPU, in bf16 when
    ``precision`` is bf16 (else fp32), on ``threads`` threads. Takes and returns torch tensors (fp32 out)."""

    def __init__(self, module: nn.Module, input_size: int, precision: str, threads: int):
        super().__init__()
        ov = _import_openvino()
        example = torch.zeros(2, 3, input_size, input_size)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about shape checks in forward()
                converted = ov.convert_model(module.eval(), example_input=example)
            config = {
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                "PERFORMANCE_HINT": "LATENCY",  # one stream on every thread: whole batches, as PyTorch runs them
                "INFERENCE_NUM_THREADS": threads,
            }
            self.compiled = ov.Core().compile_model(converted, "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types for unsupported graphs
            raise FaceclsError(f"OpenVINO could not convert the model: {first_line(exc)}") from None
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.request.infer({0: x.detach().float().contiguous().numpy()})
        return torch.from_numpy(result[0].copy())  # the request reuses its output buffer on the next call

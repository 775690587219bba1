"""Speed choices made from the machine and the recipe: device, precision, memory format, workers."""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from facecls.config import SpeedConfig
from facecls.core.errors import FaceclsError, first_line
from facecls.runtime.machine import available_cpus, cpu_info


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """bf16 matmul in hardware: AMX-BF16 or AVX512-BF16 (elsewhere CPU bf16 is emulated and slow)."""
    return cpu_info()["kind"] in ("amx", "avx512_bf16")


def openmp_threads_sleep() -> bool:
    """OpenMP threads sleep rather than spin while they wait: OMP_WAIT_POLICY=passive was in the environment
    when the process started (the ``facecls`` command sets it; it cannot be changed once torch is loaded)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"


@dataclass(frozen=True)
class Runtime:
    """Resolved speed settings; recorded in the run folder."""

    device: str
    precision: str
    channels_last: bool
    compile: bool
    workers: int
    pin_memory: bool
    threads: int
    omp_wait_policy: str = "default"
    fold_batchnorm: bool = False
    compile_inference: bool | None = None
    depthwise_fp32_input_grad: bool = False
    inference_backend: str = "auto"
    compiled_prelu: bool = False
    bf16_relu_bits: bool = False
    relu6_from_output: bool = False
    conv_gemm: bool = False
    fused_bn_prelu: bool = False
    bf16_out_of_place_residuals: bool = False
    dropout_from_bits: bool = False

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16 (bf16 has fp32's range and needs no loss scaling)."""
        return torch.amp.GradScaler(torch.device(self.device).type, enabled=self.precision == "fp16")

    def as_dict(self) -> dict:
        return asdict(self)


def check_device(device: str) -> None:
    """A device this machine has: ``cpu``, or ``cuda``/``cuda:N`` with such a GPU present."""
    if device == "cpu":
        return
    index = device.partition(":")[2]
    if not device.startswith("cuda") or device.partition(":")[0] != "cuda" or (index and not index.isdigit()):
        raise FaceclsError(f"unknown device '{device}'; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise FaceclsError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise FaceclsError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def resolve_runtime(config: SpeedConfig, device: str | None = None, local_rank: int = 0) -> Runtime:
    """Pick device, precision and loader settings from ``config`` and the machine."""
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    is_cuda = device.startswith("cuda")
    check_device(device)
    precision = config.precision
    if precision == "auto":
        if is_cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and not is_cuda:
        raise FaceclsError("speed.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    cores = available_cpus()
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores_per_proc = max(1, cores // local_procs)
    if config.workers is not None:
        workers = config.workers
    elif is_cuda:
        # The GPU waits on the loader's augmentation (about 6 ms per 224 px image and worker): on an H200 with
        # 8 workers ResNet-50 and MobileNetV2 trained at the same 1,250-1,410 img/s in fp32 and bf16, with and
        # without compile. So every core but the main process's decodes, up to 16.
        workers = min(16, max(1, cores_per_proc - 1))
    else:
        # On CPU the model and the loader share the cores; one worker keeps the augmentation of the
        # decoded-cache images well ahead of the model (measured on 2 cores: 8-12x what the fastest seed
        # model consumes, benchmarks/RESULTS.md).
        workers = 1 if cores_per_proc >= 2 else 0
    if config.threads is not None:
        threads = config.threads
    elif is_cuda:
        threads = torch.get_num_threads()
    else:
        # Spinning OpenMP threads collapse when one of them loses its core to a loader worker or another
        # process (2 threads 2.5-4x slower than 1 on a loaded 2-core machine); sleeping ones lose only the
        # stolen time (2 threads 1.5x faster than 1 when idle). So every core computes when the threads sleep,
        # and otherwise the loader workers get cores of their own.
        threads = cores_per_proc if openmp_threads_sleep() else max(1, cores_per_proc - workers)
    dropout_from_bits = config.dropout_from_bits
    if dropout_from_bits is None:  # ATen's dropout masks are MKL's vectorised draws on Intel CPUs only
        dropout_from_bits = cpu_info()["vendor"] != "GenuineIntel"
    return Runtime(
        device=device,
        precision=precision,
        channels_last=config.channels_last,
        compile=config.compile,
        workers=workers,
        pin_memory=is_cuda if config.pin_memory is None else config.pin_memory,
        threads=threads,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
        fold_batchnorm=config.fold_batchnorm,
        compile_inference=config.compile_inference,
        depthwise_fp32_input_grad=config.depthwise_fp32_input_grad and device == "cpu" and precision == "bf16",
        inference_backend=config.inference_backend,
        compiled_prelu=config.compiled_prelu and device == "cpu",
        bf16_relu_bits=config.bf16_relu_bits and device == "cpu" and precision == "bf16",
        # A compiled model has no such copy to save (inductor works on the functional graph).
        relu6_from_output=config.relu6_from_output and device == "cpu" and not config.compile,
        bf16_out_of_place_residuals=config.bf16_out_of_place_residuals and device == "cpu" and precision == "bf16",
        dropout_from_bits=dropout_from_bits and device == "cpu" and not config.compile,
        # Its plans are timed in Python at a shape's first use, which a compiled graph cannot hold.
        conv_gemm=config.conv_gemm and device == "cpu" and not config.compile,
        # Its kernels are compiled graphs of their own, which a compiled model would trace through instead.
        fused_bn_prelu=config.fused_bn_prelu and device == "cpu" and not config.compile,
    )


def use_cpu_threads(runtime: Runtime) -> None:
    """Set torch's intra-op threads for ``runtime`` (on CPU). Process-wide, so only a command's start
    calls it, once; library functions take the runtime and leave the process alone."""
    if runtime.device == "cpu":
        torch.set_num_threads(runtime.threads)


def prepare_training_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` on the runtime's device and memory format, with the CPU kernel work-arounds it turns on."""
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    model = model.to(runtime.device, memory_format=memory_format)
    if runtime.depthwise_fp32_input_grad:
        from facecls.runtime.cpu_kernels import use_fp32_input_grad_for_strided_depthwise

        use_fp32_input_grad_for_strided_depthwise(model)
    if runtime.bf16_relu_bits:
        from facecls.runtime.cpu_kernels import use_bits_relu

        use_bits_relu(model)
    if runtime.relu6_from_output:  # after use_bits_relu: BitsReLU6 does this itself on other tensors
        from facecls.runtime.cpu_kernels import use_relu6_from_output

        use_relu6_from_output(model)
    if runtime.bf16_out_of_place_residuals:
        from facecls.runtime.cpu_kernels import use_out_of_place_residuals

        use_out_of_place_residuals(model)
    if runtime.dropout_from_bits:
        from facecls.runtime.cpu_kernels import use_dropout_from_bits

        use_dropout_from_bits(model)
    if runtime.conv_gemm:
        from facecls.runtime.conv_gemm import use_gemm_convolutions

        use_gemm_convolutions(model)
    return model


def fold_batchnorm(model: nn.Module, input_size: int) -> nn.Module:
    """For inference: an eval-mode copy of ``model`` in which each BatchNorm2d that normalises nothing but a
    Conv2d's output is folded into that convolution (one op instead of two; measured 1.1x faster prediction
    for ResNet-50, 1.7x for MobileNetV2 on CPU), and each BatchNorm1d that normalises nothing but a Linear's
    N x C output into that Linear (SFace's embedding layer, a head with a hidden layer). The pairs are
    observed on a probe batch, and the copy is used only if it gives the probe the same outputs; otherwise
    ``model`` is returned unchanged."""
    model.eval()
    folded = copy.deepcopy(model)
    conv_outputs: dict[int, tuple[torch.Tensor, nn.Conv2d | nn.Linear]] = {}
    pairs: list[tuple[nn.Conv2d | nn.Linear, nn.BatchNorm2d | nn.BatchNorm1d]] = []
    foldable = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}

    def after_conv(module, args, output):
        if type(module) is nn.Conv2d or output.dim() == 2:  # BatchNorm1d on N x C x L is not a Linear's affine
            conv_outputs[id(output)] = (output, module)

    def before_bn(module, args):
        seen = conv_outputs.get(id(args[0]))
        if seen is not None and seen[0] is args[0] and foldable[type(seen[1])] is type(module):
            pairs.append((seen[1], module))

    hooks = [m.register_forward_hook(after_conv) for m in folded.modules() if type(m) in foldable]
    hooks += [m.register_forward_pre_hook(before_bn) for m in folded.modules() if type(m) in foldable.values()]
    parameter = next(model.parameters(), None)
    if parameter is None:
        return model
    probe = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(parameter.device)
    try:
        with torch.inference_mode():
            expected = folded(probe)
    finally:
        for hook in hooks:
            hook.remove()
    conv_uses = [conv for conv, _ in pairs]
    bn_uses = [bn for _, bn in pairs]
    names = {module: name for name, module in folded.named_modules()}
    changed = False
    for conv, bn in pairs:
        if conv_uses.count(conv) > 1 or bn_uses.count(bn) > 1 or bn.running_mean is None or bn.running_var is None:
            continue  # a shared or re-used module, or batch statistics at inference: leave it alone
        with torch.no_grad():
            fuse = fuse_conv_bn_weights if type(conv) is nn.Conv2d else fuse_linear_bn_weights
            conv.weight, conv.bias = fuse(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
        parent_name, _, attribute = names[bn].rpartition(".")
        setattr(folded.get_submodule(parent_name), attribute, nn.Identity())
        changed = True
    if not changed:
        return model
    with torch.inference_mode():
        got = folded(probe)
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=tolerance):
        return model
    return folded


COMPILE_INFERENCE_MIN_IMAGES = 5000
"""Below this many images compiling (6-27 s measured on 2 CPU cores) costs more than it saves."""


class CompiledInference(nn.Module):
    """``model`` compiled for inference (inductor, weights frozen: BatchNorm folding, conv+activation
    fusion, weights pre-packed once). Only full batches of ``batch_size`` go through the compiled graph; a
    smaller last batch runs eagerly rather than trigger a second compilation. If compiling fails (no C++
    compiler, an unsupported op) the eager model takes over and ``failure`` says why."""

    def __init__(self, model: nn.Module, batch_size: int):
        super().__init__()
        import torch._inductor.config  # noqa: F401 - imported here: it is slow to import and only needed now

        self.eager = model
        self.batch_size = batch_size
        self.compiled = torch.compile(model, dynamic=False)
        self.failure: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failure is not None or x.shape[0] != self.batch_size:
            return self.eager(x)
        try:
            # Inductor reads `freezing` from its config while it compiles (the first call); passed through
            # torch.compile(options=...) it did not take effect (measured: ResNet-50 36.5 vs 43.4 img/s).
            with torch._inductor.config.patch(freezing=True):
                return self.compiled(x)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: predict on, uncompiled
            self.failure = first_line(exc)
            return self.eager(x)


def use_compiled_inference(runtime: Runtime, images: int) -> bool:
    if runtime.compile_inference is not None:
        return runtime.compile_inference
    return images >= COMPILE_INFERENCE_MIN_IMAGES

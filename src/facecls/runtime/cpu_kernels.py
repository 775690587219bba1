"""Work-arounds for slow CPU kernels in bf16 training, each measured, each switchable from the recipe.

Strided depthwise convolutions (MobileNetV2's four downsampling blocks): oneDNN's bf16 kernel for the
gradient with respect to the input is pathologically slow on CPUs without AMX, while the forward pass
and the weight gradient are fast. Measured on the 2-core AVX512-BF16 machine, batch 32, channels_last:

    channels x size, stride 2    forward bf16   grad-input bf16   grad-input fp32
    96 x 56                      0.8 ms         50.7 ms           14.5 ms
    576 x 7                      0.2 ms         15.1 ms           0.3 ms

So those layers keep their bf16 forward and weight gradient, and compute the input gradient in fp32.

PReLU's backward is slow in ATen on any CPU kind: CompiledPReLU runs it as a compiled kernel (below).
ReLU and ReLU6 on bf16 activations are slow in ATen too: BitsReLU and BitsReLU6 clamp their bit patterns
(below). ATen's in-place bf16 kernels are slower than its out-of-place ones: torchvision's ResNet blocks add
their shortcut out of place (below). ATen draws dropout masks one value at a time on CPUs that are not
Intel's: BitsDropout draws four at once (below).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from facecls.core.errors import first_line

# Each work-around below has a switch that its modules read at every call, so that benchmarks/ab_steps.py can
# time the same training run with it on and off, per CPU kind; the recipe's speed.* settings decide whether
# a model's modules are switched at all.
DEPTHWISE_FP32_INPUT_GRAD = True
BITS_RELU = True
RELU6_FROM_OUTPUT = True
OUT_OF_PLACE_RESIDUALS = True
COMPILED_PRELU = True
DROPOUT_FROM_BITS = True


class _DepthwiseConvFp32InputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv_args = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        grad_x = grad_w = grad_b = None
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]] if ctx.has_bias else None, *ctx.conv_args,
                [False, need_w, need_b],
            )  # fmt: skip
        if need_x:
            # The input gradient is the transposed convolution of grad_out: unlike convolution_backward it
            # needs no fp32 copy of the input, the largest tensor here (bit for bit the same gradient; 1.3-1.6x
            # faster on the AMX Xeon, 64 x 64 x 112 x 112 at stride 2: 83 -> 62 ms).
            stride, padding, dilation, _, _, groups = ctx.conv_args
            reach = [(grad_out.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + 1 for d in range(2)]
            reach = [r + dilation[d] * (weight.shape[2 + d] - 1) for d, r in enumerate(reach)]
            output_padding = [x.shape[2 + d] - reach[d] for d in range(2)]  # the rows stride skipped at the end
            grad_x = nn.functional.conv_transpose2d(
                grad_out.float(), weight.float(), None, stride, padding, output_padding, groups, dilation
            ).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class DepthwiseConvFp32InputGrad(nn.Conv2d):
    """A strided depthwise ``nn.Conv2d`` whose input gradient is computed in fp32 when it runs in bf16.
    Same parameters and state-dict keys as ``nn.Conv2d``; identical outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not DEPTHWISE_FP32_INPUT_GRAD
            or not (torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"))
            or torch.jit.is_tracing()
        ):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu")
        if dtype != torch.bfloat16 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            return _DepthwiseConvFp32InputGrad.apply(
                x.to(dtype), self.weight.to(dtype), bias, self.stride, self.padding, self.dilation, self.groups
            )


def is_strided_depthwise(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
        and max(module.stride) > 1
    )


def switch_modules(model: nn.Module, new_class: Callable[[nn.Module], type[nn.Module] | None]) -> int:
    """Give each module of ``model`` for which ``new_class`` names a class that class, in place. The classes
    switched to here subclass the module's own and change only ``forward``: parameters, buffers and
    state-dict keys stay. Returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        cls = new_class(module)
        if cls is not None:
            module.__class__ = cls
            switched += 1
    return switched


def use_fp32_input_grad_for_strided_depthwise(model: nn.Module) -> int:
    """Switch every strided depthwise convolution of ``model`` to :class:`DepthwiseConvFp32InputGrad` (in
    place; parameters and state-dict keys unchanged). Returns how many were switched."""
    return switch_modules(model, lambda m: DepthwiseConvFp32InputGrad if is_strided_depthwise(m) else None)


# ReLU and ReLU6 on bf16 activations (ResNet-50 has 49, InceptionResNetV1 about 130, MobileNetV2 35 ReLU6):
# ATen's bf16 kernels are slow, its in-place ones most. Measured on the 2-core AMX Xeon, 64 x 256 x 56 x 56
# channels_last: relu in place 39.3 ms in bf16 (fp32, twice the bytes: 16.8), out of place 15.5-17.3 ms,
# relu6 in place 47.9 ms; the same clamps on the bit patterns read as int16, in place: 8.3 and 8.5 ms.
# That is exact: a bf16 with the sign bit clear reads as a non-negative int16 that orders like the number,
# and one with the sign bit set as a negative int16, so max(x, 0) and min(max(x, 0), 6) are the same clamps
# of the bits (with the bits of 6.0 as the upper bound). Only NaN differs: one with the sign bit set becomes
# 0, where ATen keeps NaN (NaN weights still show: the next layer multiplies its zeros by them). The
# backward is ATen's, from the output, as for ATen's in-place ReLU.
_BF16_SIX = int(torch.tensor(6.0, dtype=torch.bfloat16).view(torch.int16))


def _clamp_bits(x: torch.Tensor, upper: int | None, inplace: bool) -> torch.Tensor:
    """``x`` clamped to [0, upper] (upper: None or 6) on its bits."""
    bits, limit = x.view(torch.int16), None if upper is None else _BF16_SIX
    if inplace:
        bits.clamp_(0, limit)
        return x
    return bits.clamp(0, limit).view(torch.bfloat16)


def _clamp_values(x: torch.Tensor, upper: int | None, inplace: bool) -> torch.Tensor:
    """``x`` clamped to [0, upper] (upper: None or 6), as ATen's ReLU / ReLU6 compute it."""
    return x.clamp_(0, upper) if inplace else x.clamp(0, upper)


class _ClampFromOutput(torch.autograd.Function):
    """ReLU (upper None) or ReLU6 (upper 6) through ``clamp`` (_clamp_bits or _clamp_values), the backward
    from the output."""

    @staticmethod
    def forward(ctx, x, upper, inplace, clamp):
        if inplace:
            ctx.mark_dirty(x)
        out = clamp(x, upper, inplace)
        ctx.upper = upper
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        if ctx.upper is None:
            return torch.ops.aten.threshold_backward(grad_out, out, 0), None, None, None
        return torch.ops.aten.hardtanh_backward(grad_out, out, 0, ctx.upper), None, None, None


def _clamps_bits(x: torch.Tensor) -> bool:
    return (
        BITS_RELU
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def _relu_bits(x: torch.Tensor, upper: int | None, inplace: bool) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _ClampFromOutput.apply(x, upper, inplace, _clamp_bits)
    return _clamp_bits(x, upper, inplace)


class BitsReLU(nn.ReLU):
    """``nn.ReLU`` that clamps bf16 CPU tensors' bit patterns (see above); other tensors, tracing and
    compiling take the plain op. Same outputs, except NaN with the sign bit set, which becomes 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _relu_bits(x, None, self.inplace) if _clamps_bits(x) else super().forward(x)


# ReLU6 in place in training (MobileNetV2's 35), in any precision: autograd's formula for hardtanh_ reads the
# input, so ATen saves a copy of it before clamping, a full pass over the activation that ReLU's in-place
# op (whose backward reads its output) does not make. The input is in (0, 6) exactly where the output is,
# so the backward can read the output as ReLU's does: the same gradient, bit for bit, without the copy.
# (MobileNetV2 at 112 px, fp32, batch 64: the copies were 6-7% of the step, in the Ice Lake profile.)


class ReLU6FromOutput(nn.ReLU6):
    """``nn.ReLU6`` whose in-place form, in training, keeps no copy of its input (see above); otherwise, in
    tracing and in compiling, the plain op. The same outputs and gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            RELU6_FROM_OUTPUT
            and self.inplace
            and torch.is_grad_enabled()
            and x.requires_grad
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            return _ClampFromOutput.apply(x, 6, True, _clamp_values)
        return super().forward(x)


def use_relu6_from_output(model: nn.Module) -> int:
    """Switch every ``nn.ReLU6`` of ``model`` to :class:`ReLU6FromOutput` (in place; no parameters). Returns
    how many were switched."""
    return switch_modules(model, lambda m: ReLU6FromOutput if type(m) is nn.ReLU6 else None)


class BitsReLU6(ReLU6FromOutput):
    """``nn.ReLU6`` as :class:`BitsReLU` does ReLU (and as :class:`ReLU6FromOutput` on other tensors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _relu_bits(x, 6, self.inplace) if _clamps_bits(x) else super().forward(x)


def use_bits_relu(model: nn.Module) -> int:
    """Switch every ``nn.ReLU`` and ``nn.ReLU6`` of ``model`` to :class:`BitsReLU` / :class:`BitsReLU6` (in
    place; no parameters). Returns how many were switched."""
    return switch_modules(model, lambda m: {nn.ReLU: BitsReLU, nn.ReLU6: BitsReLU6}.get(type(m)))


# Residual adds on bf16 activations: ATen's in-place bf16 elementwise kernels run at well under half the speed
# of its out-of-place ones. Measured on the 2-core AMX Xeon, 64 x 256 x 56 x 56 channels_last, fresh
# tensors: add_ 45-51 ms, out-of-place add 20 ms (fp32 add_, twice the bytes: 21 ms); relu_ 39 ms, relu 16.
# torchvision's ResNet blocks add their shortcut in place (`out += identity`); these add it out of place,
# the same sums. The BatchNorm output that the in-place add overwrote is saved by nothing, so it is freed
# at once and peak memory stays the same. (ResNet-50 at 224 px, InceptionResNetV1 at 160 px: 1.04x per
# step; InceptionResNetV1's blocks do it in the model's own code.)
class OutOfPlaceBottleneck(Bottleneck):
    """torchvision's ``Bottleneck`` with its shortcut added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not OUT_OF_PLACE_RESIDUALS:
            return super().forward(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with its shortcut added out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not OUT_OF_PLACE_RESIDUALS:
            return super().forward(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def use_out_of_place_residuals(model: nn.Module) -> int:
    """Switch every torchvision ``Bottleneck`` / ``BasicBlock`` of ``model`` to its out-of-place form (in
    place; the same parameters and state-dict keys). Returns how many were switched."""
    swaps = {Bottleneck: OutOfPlaceBottleneck, BasicBlock: OutOfPlaceBasicBlock}
    return switch_modules(model, lambda m: swaps.get(type(m)))


# PReLU in training (SFace has 27): ATen's CPU kernel for its backward is a slow generic loop. Measured on
# the 2-core AMX Xeon, bf16, channels_last, 64 x 64 x 56 x 56: forward + backward 57 ms in ATen, 15 ms as
# inductor-generated kernels, less than ReLU's 17 ms in ATen. SFace's training step spent 37% of its time
# in PReLU's backward (benchmarks/RESULTS.md, session 6 profile). Written with where() rather than
# F.prelu, whose weight-size check makes dynamo compile once per channel count (8 recompilations in SFace,
# then its limit); this way two compilations (about 5 s) serve every layer and batch size.
def _prelu_where(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
    return torch.where(x > 0, x, x * weight)


def compile_cpu_kernel(fn: Callable) -> Callable:
    """``fn`` compiled by inductor with dynamic shapes (one compilation serves every size), as the CPU
    work-arounds here and in runtime/fused_bn.py use it."""
    # Its first compilation warns that no CUDA runtime was found: noise for a CPU kernel.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(fn, dynamic=True)


@functools.cache
def _prelu() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return compile_cpu_kernel(_prelu_where)


class CompiledPReLU(nn.PReLU):
    """``nn.PReLU`` whose forward and backward run compiled while gradients are on (training); inference,
    tracing and export take the plain op. Same parameter and state-dict keys; the same outputs up to the
    rounding of the weight gradient's sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not COMPILED_PRELU or not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super().forward(x)
        if torch.is_autocast_enabled(x.device.type):  # autocast runs prelu in its lower precision
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # A view, not the Parameter: dynamo gives parameters static shapes, which would mean one
        # compilation per channel count.
        return _prelu()(x, self.weight.view(-1))


def use_compiled_prelu(model: nn.Module, skip: Collection[nn.Module] = ()) -> tuple[int, str | None]:
    """Switch every ``nn.PReLU`` of ``model`` but those in ``skip`` to :class:`CompiledPReLU` (in place), once a
    forward and backward through the compiled op have worked here in fp32 and in bf16 (inductor needs a C++
    compiler). Returns (how many were switched, None) or (0, why not)."""
    skipped = {id(m) for m in skip}
    prelus = [m for m in model.modules() if type(m) is nn.PReLU and id(m) not in skipped]
    if not prelus:
        return 0, None
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 4, 6, 6, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
            weight = torch.full((4,), 0.25, dtype=dtype, requires_grad=True)
            _prelu()(x, weight).sum().backward()
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train with the plain op
        return 0, first_line(exc)
    for module in prelus:
        module.__class__ = CompiledPReLU
    return len(prelus), None


# Dropout in training (SFace's head drops 0.4 of its 50,176 values per image): ATen draws a CPU mask with
# bernoulli_, which is MKL's vectorised generator on Intel CPUs only; on the others it is a serial loop that
# draws a double per value. Measured on the 2-core AVX512-BF16 EPYC, the mask of a batch of 32 through
# SFace's head: 17.9 ms through bernoulli_ (2.8% of SFace's step), 1.9 ms as a quarter as many 64-bit random
# words cut into 16-bit draws. A value is dropped when its draw is below p rounded to 65,536ths (within
# 1/131,072 of p), and kept values are scaled by 1 / (1 - p), as ATen scales them.
_DRAW_LEVELS = 1 << 16


def _dropout_from_bits(x: torch.Tensor, p: float, dropped: int) -> torch.Tensor:
    """``x`` with each value dropped with probability ``dropped`` / 65,536, the others scaled by 1 / (1 - p)."""
    words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)
    # The draws in x's own strides (x is contiguous in some order), so that the product runs in x's memory order.
    draws = words.view(torch.int16)[: x.numel()].as_strided(x.shape, x.stride())
    keep = draws.ge(dropped - _DRAW_LEVELS // 2)  # int16 draws are uniform on [-32,768, 32,767]
    return x * keep.to(x.dtype).div_(1 - p)  # ATen's noise, in x's dtype


class BitsDropout(nn.Dropout):
    """``nn.Dropout`` whose training masks on CPU tensors come from 64-bit random words (see above): the drop
    probability within 1/131,072 of p, ATen's scaling. Inference, in-place dropout, tracing and compiling
    take ATen's op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * _DRAW_LEVELS)
        if (
            DROPOUT_FROM_BITS
            and self.training
            and not self.inplace
            and 0 < dropped < _DRAW_LEVELS
            and x.device.type == "cpu"
            and (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)))
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            return _dropout_from_bits(x, self.p, dropped)
        return super().forward(x)


def use_dropout_from_bits(model: nn.Module) -> int:
    """Switch every ``nn.Dropout`` of ``model`` to :class:`BitsDropout` (in place; no parameters). Returns how
    many were switched."""
    return switch_modules(model, lambda m: BitsDropout if type(m) is nn.Dropout else None)

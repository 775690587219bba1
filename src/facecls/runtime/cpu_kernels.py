"""Work-arounds for slow CPU kernels in bf16 training, each measured, each switchable from the recipe.

Strided depthwise convolutions (MobileNetV2's four downsampling blocks): oneDNN's bf16 kernel for the
gradient with respect to the input is pathologically slow on CPUs without AMX, while the forward pass
and the weight gradient are fast. Measured on the 2-core AVX512-BF16 machine, batch 32, channels_last:

    channels x size, stride 2    forward bf16   grad-input bf16   grad-input fp32
    96 x 56                      0.8 ms         50.7 ms           14.5 ms
    576 x 7                      0.2 ms         15.1 ms           0.3 ms

So those layers keep their bf16 forward and weight gradient, and compute the input gradient in fp32.
"""

from __future__ import annotations

import torch
from torch import nn


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
            grad_x, _, _ = torch.ops.aten.convolution_backward(
                grad_out.float(), x.float(), weight.float(), None, *ctx.conv_args, [True, False, False]
            )
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class DepthwiseConvFp32InputGrad(nn.Conv2d):
    """A strided depthwise ``nn.Conv2d`` whose input gradient is computed in fp32 when it runs in bf16.
    Same parameters and state-dict keys as ``nn.Conv2d``; identical outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")) or torch.jit.is_tracing():
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


def use_fp32_input_grad_for_strided_depthwise(model: nn.Module) -> int:
    """Switch every strided depthwise convolution of ``model`` to :class:`DepthwiseConvFp32InputGrad` (in
    place; parameters and state-dict keys unchanged). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if is_strided_depthwise(module):
            module.__class__ = DepthwiseConvFp32InputGrad
            switched += 1
    return switched

"""BatchNorm followed by PReLU (SFace's 27 units), in training, as two compiled passes forward and two back.

SFace's bf16 training step on a 2-core CPU spent half its time in BatchNorm and PReLU (benchmarks/RESULTS.md,
the step profiles): passes over memory that bf16 and AMX do not speed up. ATen runs BatchNorm's forward as a
statistics pass and a normalising pass, PReLU as a pass of its own (compiled, speed.compiled_prelu), and
their backward as three to four more. Here the forward is one pass for the per-channel sums and one that
normalises and applies PReLU; the backward one pass for the gradient sums and one for the input gradient,
the normalised value recomputed from the saved BatchNorm input, not stored. The passes are
inductor-generated kernels (a C++ compiler is needed, as for speed.compiled_prelu). On fresh activations of
a batch of 64 the pair ran 1.3x (7 x 7 maps) to 2.2x (112 x 112) faster; SFace's whole step 1.27x (batch
32) and 1.31x (batch 64) on the AMX Xeon, 1.59x (batch 64) on the AVX512-BF16 EPYC (benchmarks/ab_steps.py).

The same fusion for ReLU (ResNet-50, InceptionResNetV1) and ReLU6 (MobileNetV2) measured 1.2-1.45x for the
pair alone on maps of 56 x 56 and up, slower on smaller ones, and 0.98-1.04x for the whole step on the AMX
Xeon; ReLU6 on the AVX512-BF16 EPYC, fused only for activations of 2^19 values and up, 0.91-0.99x: not done.

Statistics: the mean and the biased variance of the batch as sums of (x - k) and (x - k)^2 in fp32, with k
one sample's value per channel (the shifted-data method: no cancellation when the mean is far from 0); the
running statistics take the unbiased variance and the momentum as ``nn.BatchNorm2d`` does. In fp32 the
outputs and gradients are closer to float64 ones than ATen's own (test).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from facecls.core.errors import first_line
from facecls.models.sface import ConvBNPReLU
from facecls.runtime.cpu_kernels import compile_cpu_kernel, switch_modules

# Read at every call: benchmarks/ab_steps.py turns the fused passes off and on between blocks of steps.
ENABLED = True


# The kernels see a channels_last N x C x H x W tensor as its memory is laid out: rows of C channels, grouped
# into blocks that a sum walks once per 16 channels. A block is an image when its H x W x C values fit in
# the cache (2^18 values: 512 KiB in bf16), else one of its image rows (W x C values). Summed over N, H
# and W at once, or given 4-D tensors, inductor walked the whole batch once per 16 channels (2.5-4x slower
# on fresh activations with 256 channels); in blocks of one image row, a 7 x 7 map was slower than ATen.
_BLOCK_VALUES = 1 << 18


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A channels_last N x C x H x W tensor as a blocks x rows x C view of its memory."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1)
    return rows.reshape(n, h * w, c) if h * w * c <= _BLOCK_VALUES else rows.reshape(n * h, w, c)


def _unrows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_rows`: the N x C x H x W channels_last tensor whose memory ``rows`` is."""
    n, c, h, w = shape
    return rows.view(n, h, w, c).permute(0, 3, 1, 2)


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(1).sum(0)


def _sums(x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.float() - k
    return _sum(d), _sum(d * d)


def _forward(x, scale, shift, slope):
    z = x.float() * scale + shift
    return torch.where(z > 0, z, z * slope).to(x.dtype)


def _backward_sums(g, x, scale, shift, mean):
    """Per channel, over where z > 0 and where z <= 0: the sums of dL/dy and of dL/dy * (x - mean). Each sum
    is its own expression: written with shared intermediates, inductor stored them as a full-size fp32
    tensor first (2.5x slower)."""

    def positive():
        return x.float() * scale + shift > 0

    def centred():
        return x.float() - mean

    return (
        _sum(torch.where(positive(), g.float(), 0.0)),
        _sum(torch.where(positive(), g.float() * centred(), 0.0)),
        _sum(torch.where(positive(), 0.0, g.float())),
        _sum(torch.where(positive(), 0.0, g.float() * centred())),
    )


def _backward_input(g, x, scale, shift, slope, c1, c2):
    # dL/dx = scale * (gz - sum(gz) / m - (x - mean) * rstd^2 * sum(gz * (x - mean)) / m), gz = dL/dz,
    # rearranged as scale * gz - c1 - x * c2 with per-channel c1, c2.
    gf = g.float()
    gz = torch.where(x.float() * scale + shift > 0, gf, gf * slope)
    return (scale * gz - c1 - x.float() * c2).to(x.dtype)


@functools.cache
def _kernels() -> dict[str, Callable]:
    return {f.__name__: compile_cpu_kernel(f) for f in (_sums, _forward, _backward_sums, _backward_input)}


class _BatchNormPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, slope, eps, running):
        kernels = _kernels()
        m = x.numel() // x.shape[1]
        rows = _rows(x)
        k = rows[0, 0].to(torch.float32, copy=True)
        s1, s2 = kernels["_sums"](rows, k)
        shift_mean = s1 / m
        mean = k + shift_mean
        var = (s2 / m - shift_mean * shift_mean).clamp_min(0)
        rstd = torch.rsqrt(var + eps)
        scale = weight * rstd
        shift = bias - mean * scale
        if running is not None:
            running_mean, running_var, factor = running
            running_mean.lerp_(mean, factor)
            running_var.lerp_(var * (m / (m - 1)), factor)
        ctx.save_for_backward(x, mean, rstd, scale, shift, bias, slope)
        return _unrows(kernels["_forward"](rows, scale, shift, slope), x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, scale, shift, bias, slope = ctx.saved_tensors
        kernels = _kernels()
        m = x.numel() // x.shape[1]
        grad, rows = _rows(grad.contiguous(memory_format=torch.channels_last)), _rows(x)
        g_pos, gc_pos, g_neg, gc_neg = kernels["_backward_sums"](grad, rows, scale, shift, mean)
        grad_bias = g_pos + slope * g_neg
        grad_weight = (gc_pos + slope * gc_neg) * rstd
        # PReLU's weight: the sum of dL/dy * z where z <= 0, and z = scale * (x - mean) + bias.
        grad_slope = scale * gc_neg + bias * g_neg
        c2 = scale * rstd * grad_weight / m
        c1 = scale * grad_bias / m - mean * c2
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _unrows(kernels["_backward_input"](grad, rows, scale, shift, slope, c1, c2), x.shape)
        return grad_x, grad_weight, grad_bias, grad_slope, None, None


def _fuses(bn: nn.BatchNorm2d, x: torch.Tensor) -> bool:
    return (
        ENABLED
        and type(bn) is nn.BatchNorm2d  # not SyncBatchNorm (train.sync_bn): its statistics span processes
        and bn.training
        and bn.affine
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
        and x.numel() // max(1, x.shape[1]) > 1
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


def batch_norm_prelu(bn: nn.BatchNorm2d, x: torch.Tensor, prelu: nn.PReLU) -> torch.Tensor:
    """``prelu(bn(x))``: fused for a BatchNorm in training on a channels_last CPU tensor, else the modules."""
    if not _fuses(bn, x):
        return prelu(bn(x))
    running = None
    if bn.track_running_stats and bn.running_mean is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        running = (bn.running_mean, bn.running_var, factor)
    slope = prelu.weight.float().expand(x.shape[1])  # one weight or one per channel
    with torch.autocast("cpu", enabled=False):
        return _BatchNormPReLU.apply(x, bn.weight, bn.bias, slope, bn.eps, running)


class FusedConvBNPReLU(ConvBNPReLU):
    """SFace's conv -> BatchNorm -> PReLU unit with the last two fused; same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_prelu(self.bn, self.conv(x), self.act)


def use_fused_batchnorm_prelu(model: nn.Module, dtype: torch.dtype) -> tuple[int, str | None]:
    """Switch ``model``'s conv -> BatchNorm -> PReLU units to :class:`FusedConvBNPReLU` (in place), once a
    forward and backward through the compiled kernels have worked here for activations of ``dtype``.
    Returns (how many units were switched, None) or (0, why not)."""
    if not any(type(m) is ConvBNPReLU for m in model.modules()):
        return 0, None
    try:
        x = torch.randn(2, 4, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        batch_norm_prelu(nn.BatchNorm2d(4), x.requires_grad_(), nn.PReLU(4)).float().sum().backward()
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train with ATen's kernels
        return 0, first_line(exc)
    return switch_modules(model, lambda m: FusedConvBNPReLU if type(m) is ConvBNPReLU else None), None

"""Training convolutions as matrix products where that is faster on this CPU, chosen by measuring.

oneDNN's CPU convolution kernels are slow for some shapes that face models train at: small feature maps
with many channels, above all the weight gradient. Measured on the 2-core AMX Xeon, bf16, channels_last,
batch 32 (ResNet-50 at 112 px): a 3x3 convolution of 512 channels on a 4 x 4 map takes 13-16 ms for its
weight gradient in oneDNN (150-190 GFLOP/s) and 2.1 ms as a matrix product of the output gradient and the
unfolded input (im2col, 0.5 ms, then one bf16 GEMM); 1x1 convolutions, which are matrix products already,
run 1.2-5x faster forward and backward through ``torch.mm``. On larger maps with fewer channels oneDNN wins
(64 channels at 28 x 28: the unfolding costs more than the product). Which is faster differs by shape, by
product (output, input gradient, weight gradient) and by CPU kind, so nothing here is a rule: for each
convolution shape met in training, the three products are timed both ways on synthetic tensors of that
shape, and the faster is kept (by a 10% margin, else oneDNN). Timings differ from run to run, and so would
the sums, so a plan is measured once per machine (before a run's first step: :func:`measure_model_plans`)
and kept in facecls's cache (:func:`machine_plans_file`) for every later run there: on one machine the same
seed gives the same numbers, as before. Another machine may time other plans and sum in another order (as
cuDNN's benchmark mode does on GPUs); ``speed.conv_gemm=false`` gives numbers that depend on the CPU kind
only (the demo does that). A resumed run adopts the plans its checkpoint holds, wherever it resumes.

Whole training steps on the AMX Xeon, bf16: ResNet-50 at 112 / 160 / 224 px 1.18 / 1.10 / 1.08x at
batch 32 and 1.15 / - / 1.02x at batch 64, InceptionResNetV1 at 160 px 1.15x (batch 32) and 1.04x (batch
64), MobileNetV2 unchanged (its depthwise layers are not matrix products); ResNet-50 in fp32 at 112 px
1.07x (benchmarks/RESULTS.md, session 10).

The unfolding is written with torch's strided views rather than ``F.unfold``: unfolding a channels_last
tensor into (position, kernel row, kernel column, channel) order is one copy with the channels innermost on
both sides, 0.5-0.9 ms where ``F.unfold`` takes 4.9-8.2 ms (and 5.5-11.6 ms to become the matrix) for
ResNet-50's 3x3 layers at 112 px, batch 32, bf16.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facecls.core.atomic import write_text
from facecls.runtime.cpu_kernels import switch_modules
from facecls.runtime.machine import cpu_info

# A product is done as GEMM only when it measured at most this fraction of oneDNN's time: timings on a
# shared machine are noisy, and oneDNN is the tested default.
GEMM_MARGIN = 0.9
_REPEATS = 3

# Read at every call: benchmarks/ab_steps.py turns the planned products off and on between blocks of steps.
ENABLED = True


@dataclass(frozen=True)
class ConvPlan:
    """How one convolution shape computes its output, input gradient and weight gradient (True: GEMM)."""

    forward: bool = False
    input_grad: bool = False
    weight_grad: bool = False

    @property
    def any_gemm(self) -> bool:
        return self.forward or self.input_grad or self.weight_grad


Pair = tuple[int, int]


def _out_hw(in_hw, kernel: Pair, stride: Pair, padding: Pair) -> Pair:
    return tuple((size + 2 * p - k) // s + 1 for size, k, s, p in zip(in_hw, kernel, stride, padding, strict=True))


def unfold(x: torch.Tensor, kernel: Pair, stride: Pair, padding: Pair) -> torch.Tensor:
    """A channels_last N x C x H x W input as the (N*Ho*Wo) x (kh*kw*C) matrix of its receptive fields (a
    view for 1x1 convolutions of stride 1)."""
    n, c, h, w = x.shape
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    nhwc = x.permute(0, 2, 3, 1)
    if not nhwc.is_contiguous():
        nhwc = nhwc.contiguous()
    out_h, out_w = _out_hw((h, w), kernel, stride, padding)
    s_n, s_h, s_w, s_c = nhwc.stride()
    fields = nhwc.as_strided(
        (n, out_h, out_w, kernel[0], kernel[1], c), (s_n, stride[0] * s_h, stride[1] * s_w, s_h, s_w, s_c)
    )
    return fields.reshape(n * out_h * out_w, kernel[0] * kernel[1] * c)


def fold(columns: torch.Tensor, shape: torch.Size, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair):
    """The input gradient from the gradient of :func:`unfold`'s matrix: each receptive field's entries
    summed back onto the input positions they came from (in fp32), as a channels_last tensor."""
    n, c, h, w = shape
    if kernel == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return columns.view(n, h, w, c).permute(0, 3, 1, 2)
    fields = columns.view(n, *out_hw, *kernel, c)
    summed = columns.new_zeros((n, h + 2 * padding[0], w + 2 * padding[1], c), dtype=torch.float32)
    rows, cols = (stride[0] * (out_hw[0] - 1) + 1, stride[1] * (out_hw[1] - 1) + 1)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            summed[:, i : i + rows : stride[0], j : j + cols : stride[1]] += fields[:, :, :, i, j]
    inside = summed[:, padding[0] : padding[0] + h, padding[1] : padding[1] + w]
    return inside.to(columns.dtype).permute(0, 3, 1, 2)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """K x C x kh x kw as K x (kh*kw*C), the column order of :func:`unfold`."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _gemm_output(columns, weight, bias, n: int, out_hw: Pair) -> torch.Tensor:
    matrix = _weight_matrix(weight).t()
    flat = columns @ matrix if bias is None else torch.addmm(bias, columns, matrix)
    return flat.view(n, *out_hw, weight.shape[0]).permute(0, 3, 1, 2)


def _as_rows(grad_out: torch.Tensor) -> torch.Tensor:
    """A channels_last N x K x Ho x Wo gradient as its (N*Ho*Wo) x K matrix."""
    return grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])


def _onednn_backward(grad_out, x, weight, stride, padding, mask: list[bool]):
    """oneDNN's input and/or weight gradient (``mask``); the bias gradient is summed by the caller."""
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, mask + [False]
    )


class _PlannedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, plan):
        out_hw = _out_hw(x.shape[2:], weight.shape[2:], stride, padding)
        columns = None
        if plan.forward:
            columns = unfold(x, tuple(weight.shape[2:]), stride, padding)
            y = _gemm_output(columns, weight, bias, x.shape[0], out_hw)
        else:
            y = F.conv2d(x, weight, bias, stride, padding)
        ctx.save_for_backward(x, weight, columns if plan.weight_grad else None)
        ctx.conv = (stride, padding, plan, bias is not None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, columns = ctx.saved_tensors
        stride, padding, plan, has_bias = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        kernel = tuple(weight.shape[2:])
        grad_x = grad_w = grad_b = None
        onednn = [need_x and not plan.input_grad, need_w and not plan.weight_grad]
        if any(onednn):
            grad_x, grad_w, _ = _onednn_backward(grad_out, x, weight, stride, padding, onednn)
        rows = _as_rows(grad_out) if (need_x and plan.input_grad) or (need_w and plan.weight_grad) or need_b else None
        if need_x and plan.input_grad:
            grad_x = fold(rows @ _weight_matrix(weight), x.shape, kernel, stride, padding, tuple(grad_out.shape[2:]))
        if need_w and plan.weight_grad:
            if columns is None:
                columns = unfold(x, kernel, stride, padding)
            grad_w = (rows.t() @ columns).view(weight.shape[0], *kernel, weight.shape[1]).permute(0, 3, 1, 2)
        if need_b and has_bias:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def planned_conv2d(x, weight, bias, stride: Pair, padding: Pair, plan: ConvPlan) -> torch.Tensor:
    """``F.conv2d`` (groups 1, dilation 1, zero padding) on a channels_last CPU input, each product done as
    ``plan`` says. Inputs in one dtype; no autocast inside."""
    return _PlannedConv.apply(x, weight, bias, tuple(stride), tuple(padding), plan)


def _fastest_time(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(_REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_plan(x_shape, weight_shape, has_bias: bool, stride: Pair, padding: Pair, dtype) -> ConvPlan:
    """Time each product of this convolution both ways on synthetic channels_last CPU tensors."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(weight_shape, generator=generator) * 0.05).to(dtype)
    bias = torch.zeros(weight_shape[0], dtype=dtype) if has_bias else None
    kernel = tuple(weight_shape[2:])
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        y = F.conv2d(x, weight, bias, stride, padding)
        grad_out = torch.randn(y.shape, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
        out_hw = tuple(y.shape[2:])
        rows = _as_rows(grad_out)

        def onednn(mask):
            return lambda: _onednn_backward(grad_out, x, weight, stride, padding, mask)

        def unfolded():
            return unfold(x, kernel, stride, padding)

        forward = _fastest_time(lambda: _gemm_output(unfolded(), weight, bias, x.shape[0], out_hw))
        forward_onednn = _fastest_time(lambda: F.conv2d(x, weight, bias, stride, padding))
        input_gemm = _fastest_time(
            lambda: fold(rows @ _weight_matrix(weight), x.shape, kernel, stride, padding, out_hw)
        )
        weight_gemm = _fastest_time(lambda: rows.t() @ unfolded())
        input_onednn = _fastest_time(onednn([True, False]))
        weight_onednn = _fastest_time(onednn([False, True]))
        both_onednn = _fastest_time(onednn([True, True]))
    # The backward as one oneDNN call, or either product (or both) as GEMM: the fastest of the four.
    backward = {
        (False, False): both_onednn,
        (True, False): input_gemm + weight_onednn,
        (False, True): input_onednn + weight_gemm,
        (True, True): input_gemm + weight_gemm,
    }
    choice = min(backward, key=backward.get)
    if backward[choice] > GEMM_MARGIN * both_onednn:
        choice = (False, False)
    return ConvPlan(forward < GEMM_MARGIN * forward_onednn, *choice)


_PLANS: dict[tuple, ConvPlan] = {}


def _key(x: torch.Tensor, weight: torch.Tensor, has_bias: bool, stride: Pair, padding: Pair) -> tuple:
    return (tuple(x.shape[1:]), tuple(weight.shape), has_bias, tuple(stride), tuple(padding), x.dtype,
            torch.get_num_threads())  # fmt: skip


def plan_for(x: torch.Tensor, weight: torch.Tensor, has_bias: bool, stride: Pair, padding: Pair) -> ConvPlan:
    """The measured plan for this shape, measured at its first use in the process. The batch size is not
    part of the key (an epoch's last, smaller batch keeps the plan its full batches measured)."""
    key = _key(x, weight, has_bias, stride, padding)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = measure_plan(tuple(x.shape), tuple(weight.shape), has_bias, stride, padding, x.dtype)
    return plan


def plans_measured() -> dict[tuple, ConvPlan]:
    """The plans measured so far in this process (a copy)."""
    return dict(_PLANS)


def export_plans() -> list[list]:
    """The plans of this process as plain lists, for a checkpoint: a resumed run adopts them
    (:func:`adopt_plans`) and so sums in the same order as the run it continues."""
    return [[*map(list, key[:2]), key[2], *map(list, key[3:5]), str(key[5]).removeprefix("torch."), key[6],
             [plan.forward, plan.input_grad, plan.weight_grad]] for key, plan in _PLANS.items()]  # fmt: skip


def adopt_plans(rows: list[list]) -> int:
    """Take the plans :func:`export_plans` wrote (rows of another form are ignored). Returns how many."""
    adopted = 0
    for row in rows or []:
        try:
            input_chw, weight, has_bias, stride, padding, dtype, threads, products = row
            key = (tuple(map(int, input_chw)), tuple(map(int, weight)), bool(has_bias), tuple(map(int, stride)),
                   tuple(map(int, padding)), getattr(torch, str(dtype)), int(threads))  # fmt: skip
            plan = ConvPlan(*map(bool, products))
        except (TypeError, ValueError, AttributeError):
            continue
        if isinstance(key[5], torch.dtype):
            _PLANS[key] = plan
            adopted += 1
    return adopted


def machine_plans_file(cache_root: Path) -> Path:
    """This machine's plans in facecls's cache: one file per CPU model, speed flags and torch version."""
    info = cpu_info()
    tag = json.dumps([info["model"], info["flags"], torch.__version__])
    return Path(cache_root) / "conv_plans" / f"{hashlib.sha256(tag.encode()).hexdigest()[:16]}.json"


def load_plans_file(path: Path) -> int:
    """Adopt the plans in ``path`` (missing or unreadable: none). Returns how many."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    return adopt_plans(rows) if isinstance(rows, list) else 0


def save_plans_file(path: Path) -> None:
    """Write this process's plans to ``path`` atomically (a reader sees the old file or the new one)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(export_plans()) + "\n")


def measure_model_plans(model: nn.Module, example: torch.Tensor, autocast) -> tuple[dict[tuple, ConvPlan], int]:
    """Measure, before training, the plan of every :class:`GemmConv2d` shape a training batch like
    ``example`` meets in ``model``, in one forward pass without gradients and in eval mode: the model's
    weights, BatchNorm statistics and the RNG are left as they were. ``autocast``: the training's autocast
    context. Returns the plans of the model's shapes and how many of them were measured now (those already
    known are not measured again)."""
    before = len(_PLANS)
    met: dict[tuple, ConvPlan] = {}

    def plan_input(module: GemmConv2d, args) -> None:
        x, weight, bias = module._operands(args[0])
        if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            plan = plan_for(x, weight, bias is not None, module.stride, module.padding)
            met[_key(x, weight, bias is not None, module.stride, module.padding)] = plan

    modes = {module: module.training for module in model.modules()}
    hooks = [m.register_forward_pre_hook(plan_input) for m in model.modules() if isinstance(m, GemmConv2d)]
    try:
        model.eval()
        with torch.no_grad(), autocast:
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return met, len(_PLANS) - before


class GemmConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, while training on a channels_last CPU input, computes its output and gradients
    by the plan measured for its shape (oneDNN or GEMM per product). Inference, other devices and memory
    formats, tracing and compiling take the plain op. Same parameters and state-dict keys; the same results
    up to the rounding of the sums."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._planned(x):
            return super().forward(x)
        x, weight, bias = self._operands(x)
        plan = plan_for(x, weight, bias is not None, self.stride, self.padding)
        if not plan.any_gemm:
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return planned_conv2d(x, weight, bias, self.stride, self.padding, plan)

    def _operands(self, x: torch.Tensor):
        """Input, weight and bias in the dtype the convolution runs in (autocast's, when it is on)."""
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return x, weight, bias

    def _planned(self, x: torch.Tensor) -> bool:
        return (
            ENABLED
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        )


def is_plannable(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def use_gemm_convolutions(model: nn.Module) -> int:
    """Switch every plain convolution of ``model`` (groups 1, dilation 1, zero padding) to
    :class:`GemmConv2d` (in place; parameters and state-dict keys unchanged). Returns how many."""
    return switch_modules(model, lambda m: GemmConv2d if is_plannable(m) else None)

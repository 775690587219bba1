"""CPU bf16 work-arounds: same results as the plain layers, switchable, recorded."""

import torch
from torch import nn
from torchvision.models import mobilenet_v2

from facecls.config import SpeedConfig
from facecls.runtime.cpu_kernels import DepthwiseConvFp32InputGrad, use_fp32_input_grad_for_strided_depthwise
from facecls.runtime.speed import prepare_training_model, resolve_runtime


def _grads(conv: nn.Module, x: torch.Tensor, autocast: bool):
    x = x.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = conv(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.float(), x.grad.float(), conv.weight.grad.float(), conv.bias.grad.float()


def test_strided_depthwise_matches_the_plain_convolution():
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=True).to(memory_format=torch.channels_last)
    switched = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=True).to(memory_format=torch.channels_last)
    switched.load_state_dict(plain.state_dict())
    assert use_fp32_input_grad_for_strided_depthwise(switched) == 1
    assert isinstance(switched, DepthwiseConvFp32InputGrad)
    x = torch.randn(4, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    reference = _grads(plain, x, autocast=False)  # fp32
    bf16_plain = _grads(plain, x, autocast=True)
    bf16_switched = _grads(switched, x, autocast=True)
    assert bf16_switched[0].dtype == bf16_plain[0].dtype
    assert torch.equal(bf16_switched[0], bf16_plain[0])  # the forward is the same bf16 convolution
    for got, plain_bf16, want in zip(bf16_switched, bf16_plain, reference, strict=True):
        scale = want.abs().max()
        # at least as close to the fp32 gradients as the plain bf16 layer is
        assert (got - want).abs().max() <= max((plain_bf16 - want).abs().max(), 1e-6) * 1.01 + 1e-3 * scale
    # outside bf16 autocast (fp32 training, evaluation) the layer is an ordinary convolution
    assert all(torch.equal(a, b) for a, b in zip(_grads(switched, x, False), reference, strict=True))


def test_mobilenet_v2_switches_its_four_strided_depthwise_layers_and_keeps_its_keys():
    model = mobilenet_v2(weights=None)
    keys = list(model.state_dict())
    assert use_fp32_input_grad_for_strided_depthwise(model) == 4
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, DepthwiseConvFp32InputGrad) for m in model.modules()) == 4


def test_prepare_training_model_applies_it_only_for_cpu_bf16_and_when_on():
    bf16 = resolve_runtime(SpeedConfig(precision="bf16"), "cpu")
    off = resolve_runtime(SpeedConfig(precision="bf16", depthwise_fp32_input_grad=False), "cpu")
    fp32 = resolve_runtime(SpeedConfig(precision="fp32"), "cpu")
    assert bf16.as_dict()["depthwise_fp32_input_grad"] is True  # recorded in run.json
    assert off.depthwise_fp32_input_grad is False and fp32.depthwise_fp32_input_grad is False
    counts = []
    for runtime in (bf16, off, fp32):
        model = prepare_training_model(mobilenet_v2(weights=None), runtime)
        counts.append(sum(isinstance(m, DepthwiseConvFp32InputGrad) for m in model.modules()))
        assert model.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert counts == [4, 0, 0]

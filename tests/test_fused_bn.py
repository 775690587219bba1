"""BatchNorm + PReLU fused for CPU training: the modules' numbers, the modules' running statistics, the
modules themselves wherever it does not apply, and switched on where SFace's backbone trains."""

import pytest
import torch
from torch import nn

from facecls.models.sface import SFace
from facecls.runtime.fused_bn import FusedConvBNPReLU, batch_norm_prelu, use_fused_batchnorm_prelu


def _prelus(channels: int) -> dict[str, nn.PReLU]:
    per_channel = nn.PReLU(channels)
    with torch.no_grad():
        per_channel.weight.copy_(torch.linspace(-0.3, 0.6, channels))  # negative slopes too
    return {"per channel": per_channel, "one weight": nn.PReLU()}


def _batchnorm(channels: int, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, channels))
        bn.running_mean.fill_(0.2)
        bn.running_var.fill_(2.0)
    return bn


def _run(bn: nn.BatchNorm2d, prelu: nn.PReLU, x: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    """Output, gradients (input, BatchNorm weight and bias, PReLU weight) and running statistics after two
    training steps, in float64."""
    x = x.detach().clone().requires_grad_()
    params = [bn.weight, bn.bias, prelu.weight]
    for p in params:
        p.grad = None
    for _ in range(2):
        y = batch_norm_prelu(bn, x, prelu) if fused else prelu(bn(x))
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
    (y.double() * weights).sum().backward()
    stats = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    return [t.detach().double() for t in (y, x.grad, *(p.grad for p in params), *stats)]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("side", [5, 40])  # a map small enough to sum by image, one summed by image row
def test_fused_equals_the_modules_run_in_float64(momentum, side):
    """fp32: every output, gradient and running statistic to 1e-4 of its scale against the modules run in
    float64 (a mean 2 and a spread 3 that sums of x and x^2 without a shift would lose digits to)."""
    torch.manual_seed(0)
    channels = 8 if side == 40 else 200  # 5 x 5 x 200 values: summed by image; 40 x 40 x 8: by image row
    x = (torch.randn(3, channels, side, side) * 3 + 2).contiguous(memory_format=torch.channels_last)
    for name, prelu in _prelus(channels).items():
        want = _run(_batchnorm(channels, momentum).double(), prelu.double(), x.double(), fused=False)
        got = _run(_batchnorm(channels, momentum), _prelus(channels)[name], x, fused=True)
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            scale = w.abs().max().clamp_min(1e-6)
            assert (g - w).abs().max() <= 1e-4 * scale, (name, index, float((g - w).abs().max() / scale))


def test_bf16_activations_stay_bf16_and_match_to_its_rounding():
    torch.manual_seed(1)
    channels = 16
    x = (torch.randn(4, channels, 24, 24) * 2 + 1).contiguous(memory_format=torch.channels_last)
    want = _run(_batchnorm(channels).double(), _prelus(channels)["per channel"].double(), x.double(), fused=False)
    y = batch_norm_prelu(_batchnorm(channels), x.bfloat16().requires_grad_(), _prelus(channels)["per channel"])
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    got = _run(_batchnorm(channels), _prelus(channels)["per channel"], x.bfloat16(), fused=True)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g - w).abs().mean() <= 1e-2 * w.abs().mean().clamp_min(1e-6), index


def test_where_it_does_not_apply_it_is_the_modules_exactly():
    torch.manual_seed(2)
    bn, prelu = _batchnorm(8), nn.PReLU(8)
    x = torch.randn(2, 8, 6, 6)
    cases = {
        "not channels_last": (x, True, True),
        "eval mode": (x.contiguous(memory_format=torch.channels_last), False, True),
        "no gradients": (x.contiguous(memory_format=torch.channels_last), True, False),
    }
    for name, (inp, training, grad) in cases.items():
        bn.train(training)
        with torch.set_grad_enabled(grad):
            assert torch.equal(batch_norm_prelu(bn, inp, prelu), prelu(bn(inp))), name
    bn.train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(_batchnorm(8)))[0]  # train.sync_bn's
    inp = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch_norm_prelu(synced, inp, prelu), prelu(synced(inp)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # ATen's own error
        batch_norm_prelu(bn, torch.randn(1, 8, 1, 1).contiguous(memory_format=torch.channels_last), prelu)


def test_sface_switched_keeps_its_weights_and_trains_to_the_same_numbers():
    torch.manual_seed(3)
    plain = SFace().to(memory_format=torch.channels_last)
    switched = SFace().to(memory_format=torch.channels_last)
    switched.load_state_dict(plain.state_dict())
    keys = list(switched.state_dict())
    assert use_fused_batchnorm_prelu(switched, torch.float32) == (27, None)
    assert list(switched.state_dict()) == keys
    x = torch.rand(6, 3, 112, 112).contiguous(memory_format=torch.channels_last) * 255
    projection = torch.randn(6, 128)
    results = []
    for model in (plain, switched):
        model.train()
        torch.manual_seed(4)  # the same dropout mask
        out = model(x)
        (out * projection).sum().backward()
        grads = torch.stack([p.grad.norm() for p in model.parameters()])
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, rtol=1e-3, atol=1e-3 * out_a.abs().max())
    assert torch.allclose(grads_a, grads_b, rtol=1e-3, atol=1e-3 * grads_a.max())
    for a, b in zip(plain.state_dict().values(), switched.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)  # running statistics too
    with torch.no_grad():  # inference: the plain modules, with the running statistics both kept
        want = plain.eval()(x)
        assert torch.allclose(switched.eval()(x), want, rtol=1e-3, atol=1e-3 * want.abs().max())


def test_fused_only_where_the_backbone_trains_and_recorded(build_sface):
    def fused_units(overrides: list[str], fine_tune: bool = True) -> tuple[int, bool]:
        setup, runtime = build_sface(overrides, fine_tune)
        units = sum(type(m) is FusedConvBNPReLU for m in setup.model.modules())
        return units, runtime.as_dict()["fused_bn_prelu"]  # as run.json records it

    assert fused_units([]) == (27, True)
    assert fused_units([], fine_tune=False) == (0, True)  # the recipe as it is: the backbone never trains
    assert fused_units(["speed.fused_bn_prelu=false"]) == (0, False)
    assert fused_units(["speed.compile=true"]) == (0, False)

"""Training convolutions as matrix products: the same results as oneDNN's, plans measured once and kept."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from facecls.config import SpeedConfig
from facecls.runtime import conv_gemm
from facecls.runtime.conv_gemm import ConvPlan, GemmConv2d, planned_conv2d, use_gemm_convolutions
from facecls.runtime.speed import prepare_training_model, resolve_runtime

ALL_PLANS = [ConvPlan(*bits) for bits in itertools.product([False, True], repeat=3)]
# (input N x C x H x W, output channels, kernel, stride, padding, bias): the kinds face models have
SHAPES = [
    ((3, 5, 9, 7), 4, (3, 3), (2, 2), (1, 1), True),
    ((2, 6, 8, 8), 5, (1, 1), (1, 1), (0, 0), False),
    ((2, 4, 9, 9), 3, (1, 7), (1, 1), (0, 3), True),  # InceptionResNetV1's 1x7 / 7x1
    ((2, 3, 11, 11), 4, (7, 7), (2, 2), (3, 3), False),  # ResNet's stem
    ((2, 4, 6, 6), 8, (1, 1), (2, 2), (0, 0), True),  # a strided 1x1 shortcut
]


@pytest.fixture(autouse=True)
def _own_plans(monkeypatch):
    monkeypatch.setattr(conv_gemm, "_PLANS", {})


def _bf16_exact(*shape: int) -> torch.Tensor:
    """Values a bf16 holds exactly, so fp32, bf16 and the fp64 reference start from the same numbers."""
    return torch.randn(*shape).bfloat16().double()


def _results(conv, x, weight, bias, dtype):
    """Output and the gradients of input, weight and bias (those that exist), in fp64."""
    x = x.detach().to(dtype).clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = weight.detach().to(dtype).clone().requires_grad_()
    leaves = [x, weight] if bias is None else [x, weight, bias.detach().to(dtype).clone().requires_grad_()]
    y = conv(*leaves) if bias is not None else conv(x, weight, None)
    grad = torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view(y.shape).bfloat16().to(dtype)
    y.backward(grad)
    return [y.double(), *(leaf.grad.double() for leaf in leaves)]


@pytest.mark.parametrize(("shape", "out_channels", "kernel", "stride", "padding", "has_bias"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_plan_gives_the_convolution_and_its_gradients(
    shape, out_channels, kernel, stride, padding, has_bias, dtype
):
    torch.manual_seed(0)
    x, weight = _bf16_exact(*shape), _bf16_exact(out_channels, shape[1], *kernel)
    bias = _bf16_exact(out_channels) if has_bias else None
    want = _results(lambda a, w, b: F.conv2d(a, w, b, stride, padding), x, weight, bias, torch.float64)
    # fp32 sums in another order than fp64; bf16 rounds every output and gradient to 8 bits
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for plan in ALL_PLANS:
        got = _results(lambda a, w, b, p=plan: planned_conv2d(a, w, b, stride, padding, p), x, weight, bias, dtype)
        assert got[0].shape == want[0].shape
        for name, a, b in zip(["output", "input grad", "weight grad", "bias grad"], got, want, strict=False):
            error = ((a - b).abs().max() / b.abs().max()).item()
            assert error < tolerance, (plan, name, error)


def test_only_the_gradients_asked_for_are_computed():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)  # an image: no gradient
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    frozen = torch.randn(4, 4, 1, 1)
    y = planned_conv2d(x, weight, None, (1, 1), (1, 1), ConvPlan(True, True, True))
    out = planned_conv2d(y, frozen, None, (1, 1), (0, 0), ConvPlan(True, True, True))
    out.sum().backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape and frozen.grad is None
    expected = torch.autograd.grad(F.conv2d(F.conv2d(x, weight, None, 1, 1), frozen).sum(), weight)[0]
    assert torch.allclose(weight.grad, expected, rtol=1e-4, atol=1e-4)


def _train_step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).mean()
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters())]


def test_a_resnet_trains_as_with_onednn_through_any_plan(monkeypatch):
    torch.manual_seed(0)
    plain = resnet18(num_classes=7).to(memory_format=torch.channels_last)
    switched = resnet18(num_classes=7).to(memory_format=torch.channels_last)
    switched.load_state_dict(plain.state_dict())
    keys = list(switched.state_dict())
    assert use_gemm_convolutions(switched) == 20  # the stem, 16 in the blocks, 3 shortcuts
    assert list(switched.state_dict()) == keys and sum(isinstance(m, GemmConv2d) for m in switched.modules()) == 20
    x = torch.randn(4, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    want = _train_step(plain, x)
    # whatever the timings say on this machine, and every product as a matrix product
    measured = _train_step(switched, x)
    assert conv_gemm.plans_measured()  # measured at the first training forward
    monkeypatch.setattr(conv_gemm, "_PLANS", {})
    monkeypatch.setattr(conv_gemm, "measure_plan", lambda *args: ConvPlan(True, True, True))
    all_gemm = _train_step(switched, x)
    for got in (measured, all_gemm):
        for a, b in zip(got, want, strict=True):
            error = float((a - b).abs().max() / b.abs().max())
            assert error < 1e-4, error  # fp32 sums in another order


def test_inference_and_other_formats_take_the_plain_convolution(monkeypatch):
    monkeypatch.setattr(conv_gemm, "measure_plan", lambda *args: pytest.fail("measured outside training"))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    use_gemm_convolutions(conv)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        conv(x.contiguous(memory_format=torch.channels_last))
    conv(x.requires_grad_())  # contiguous (NCHW), not channels_last
    assert not conv_gemm.plans_measured()


def test_switched_off_in_process_the_plain_convolution_trains(monkeypatch):
    """benchmarks/ab_steps.py turns conv_gemm.ENABLED off between blocks: no plan is looked up then."""
    monkeypatch.setattr(conv_gemm, "plan_for", lambda *args: pytest.fail("planned while switched off"))
    monkeypatch.setattr(conv_gemm, "ENABLED", False)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    use_gemm_convolutions(conv)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_plans_are_measured_before_training_once_per_shape_leaving_the_model_as_it_was():
    torch.manual_seed(0)
    model = resnet18(num_classes=3).to(memory_format=torch.channels_last)
    use_gemm_convolutions(model)
    model.train()
    model.layer1[0].bn1.eval()  # a deliberately frozen BatchNorm keeps its mode
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    example = torch.zeros(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    calls = []
    real = conv_gemm.measure_plan
    conv_gemm.measure_plan = lambda *args: calls.append(args) or real(*args)
    try:
        plans, measured = conv_gemm.measure_model_plans(model, example, torch.autocast("cpu", enabled=False))
        assert measured == len(calls) == len({(a[0][1:], *a[1:]) for a in calls})  # each shape once
        assert 8 <= measured < 20  # ResNet-18's 20 convolutions have repeated shapes
        assert plans == conv_gemm.plans_measured()
        again = conv_gemm.measure_model_plans(model, example, torch.autocast("cpu", enabled=False))
        assert again == (plans, 0)
    finally:
        conv_gemm.measure_plan = real
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no BatchNorm statistics moved


def test_plans_go_into_a_checkpoint_and_come_back(tmp_path):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    use_gemm_convolutions(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(2, 4, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_())
    plans = conv_gemm.plans_measured()
    assert len(plans) == 1 and next(iter(plans))[5] == torch.bfloat16
    torch.save({"conv_plans": conv_gemm.export_plans()}, tmp_path / "c.ckpt")
    rows = torch.load(tmp_path / "c.ckpt", weights_only=True)["conv_plans"]  # plain types only
    conv_gemm._PLANS.clear()
    assert conv_gemm.adopt_plans([*rows, ["junk"], [[1], [2], 3, [4], [5], "not_a_dtype", 1, [1, 1, 1]]]) == 1
    assert conv_gemm.plans_measured() == plans
    assert conv_gemm.adopt_plans(None) == 0


def test_on_for_cpu_training_without_compile_and_recorded():
    on = resolve_runtime(SpeedConfig(), "cpu")
    assert on.as_dict()["conv_gemm"] is True  # recorded in run.json
    assert resolve_runtime(SpeedConfig(precision="fp32"), "cpu").conv_gemm  # the plans are timed in fp32 then
    assert not resolve_runtime(SpeedConfig(compile=True), "cpu").conv_gemm
    assert not resolve_runtime(SpeedConfig(conv_gemm=False), "cpu").conv_gemm
    model = prepare_training_model(resnet18(num_classes=3), on)
    assert sum(type(m) is GemmConv2d for m in model.modules()) == 20


def test_the_machines_plans_are_kept_for_later_runs(tmp_path):
    path = conv_gemm.machine_plans_file(tmp_path)
    assert path.parent == tmp_path / "conv_plans" and path == conv_gemm.machine_plans_file(tmp_path)
    assert conv_gemm.load_plans_file(path) == 0  # none yet
    conv_gemm._PLANS[((4, 8, 8), (6, 4, 3, 3), False, (1, 1), (1, 1), torch.float32, 2)] = ConvPlan(False, True, True)
    conv_gemm.save_plans_file(path)
    plans = conv_gemm.plans_measured()
    conv_gemm._PLANS.clear()
    assert conv_gemm.load_plans_file(path) == 1 and conv_gemm.plans_measured() == plans
    path.write_text("{not json")
    assert conv_gemm.load_plans_file(path) == 0  # a damaged file: measured again, no error

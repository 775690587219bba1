"""CPU bf16 work-arounds: same results as the plain layers, switchable, recorded."""

from collections import Counter

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet50

from facecls.config import SpeedConfig
from facecls.runtime.cpu_kernels import (
    BitsDropout,
    BitsReLU,
    BitsReLU6,
    CompiledPReLU,
    DepthwiseConvFp32InputGrad,
    OutOfPlaceBasicBlock,
    OutOfPlaceBottleneck,
    ReLU6FromOutput,
    use_bits_relu,
    use_compiled_prelu,
    use_dropout_from_bits,
    use_fp32_input_grad_for_strided_depthwise,
    use_out_of_place_residuals,
    use_relu6_from_output,
)
from facecls.runtime.speed import prepare_training_model, resolve_runtime


def _grads(layer: nn.Module, x: torch.Tensor, autocast: bool):
    """The layer's output and the gradients of its input and of each parameter (in ``parameters()`` order)."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.float(), x.grad.float(), *(p.grad.float() for p in layer.parameters())


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


@pytest.mark.parametrize("side", [14, 15])  # an even and an odd input: the transposed convolution's last row
@pytest.mark.parametrize("kernel, padding, dilation", [(3, 1, 1), (5, 2, 1), (3, 2, 2)])
def test_strided_depthwise_input_gradient_is_convolution_backward_in_fp32(side, kernel, padding, dilation):
    torch.manual_seed(side + kernel)
    layer = nn.Conv2d(8, 8, kernel, stride=2, padding=padding, dilation=dilation, groups=8, bias=False)
    layer = layer.to(memory_format=torch.channels_last)
    use_fp32_input_grad_for_strided_depthwise(layer)
    x = torch.randn(3, 8, side, side).contiguous(memory_format=torch.channels_last).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    want = torch.ops.aten.convolution_backward(
        grad.float(), x.detach().float(), layer.weight.bfloat16().float(), None,
        [2, 2], [padding] * 2, [dilation] * 2, False, [0, 0], 8, [True, False, False],
    )[0].bfloat16()  # fmt: skip
    assert x.grad.shape == x.shape and torch.equal(x.grad, want)


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


def test_compiled_prelu_matches_the_plain_layer_in_fp32_and_bf16():
    torch.manual_seed(0)
    plain = nn.PReLU(8)
    nn.init.uniform_(plain.weight, 0.1, 0.4)
    switched = nn.Sequential(nn.PReLU(8))
    switched[0].load_state_dict(plain.state_dict())
    keys = list(switched.state_dict())
    assert use_compiled_prelu(switched) == (1, None)
    assert isinstance(switched[0], CompiledPReLU) and list(switched.state_dict()) == keys
    for shape in ((4, 8, 10, 10), (3, 8)):  # feature maps, and an embedding vector
        x = torch.randn(shape)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        want, got = _grads(plain, x, autocast=False), _grads(switched[0], x, autocast=False)
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        want, got = _grads(plain, x, autocast=True), _grads(switched[0], x, autocast=True)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the same bf16 values
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=2e-2)  # a sum of bf16 products
    with torch.no_grad():  # inference takes the plain op
        x = torch.randn(2, 8, 3, 3)
        assert torch.equal(switched[0](x), plain(x))


def test_compiled_prelu_compiles_once_for_every_channel_count_and_batch():
    """Dynamo gives parameters static shapes: passed as the Parameter, the weight would cost a compilation
    per channel count (SFace has six) and hit dynamo's limit of eight."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    for channels, batch, side in ((16, 4, 40), (32, 3, 40), (64, 5, 40), (128, 2, 40), (256, 7, 40)):
        layer = nn.PReLU(channels)
        layer.__class__ = CompiledPReLU
        x = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
        layer(x.requires_grad_()).sum().backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_prelu_is_used_only_where_the_backbone_trains(build_sface):
    def prelus(overrides: list[str], fine_tune: bool = True) -> set[type]:
        setup, _ = build_sface(overrides, fine_tune)
        kinds = {type(m) for m in setup.model.modules() if isinstance(m, nn.PReLU)}
        assert kinds
        return kinds

    unfused = ["speed.fused_bn_prelu=false"]  # else SFace's PReLUs all run in fused pairs
    assert prelus(unfused) == {CompiledPReLU}
    assert prelus([]) == {nn.PReLU}
    assert prelus([], fine_tune=False) == {nn.PReLU}  # the recipe as it is: the backbone never trains
    assert prelus([*unfused, "speed.compiled_prelu=false"]) == {nn.PReLU}


def test_relu_and_relu6_on_the_bits_equal_atens_bit_for_bit():
    torch.manual_seed(0)
    values = torch.randn(2, 8, 6, 6) * 4
    edge = torch.tensor([0.0, -0.0, 6.0, 6.03125, 5.96875, float("inf"), float("-inf"), 1e-40, -1e-40, 3e38])
    values.view(-1)[: edge.numel()] = edge
    x = values.bfloat16().contiguous(memory_format=torch.channels_last)
    for plain_cls, bits_cls in ((nn.ReLU, BitsReLU), (nn.ReLU6, BitsReLU6)):
        for inplace in (False, True):
            plain, bits = plain_cls(inplace=inplace), plain_cls(inplace=inplace)
            assert use_bits_relu(bits) == 1 and type(bits) is bits_cls
            results = []
            for layer in (plain, bits):
                leaf = x.clone().requires_grad_()
                out = layer(leaf * 1)  # in place needs a tensor that is not a leaf
                out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).bfloat16())
                results.append((out.detach(), leaf.grad))
            (want, want_grad), (got, got_grad) = results
            assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(got_grad, want_grad)
            with torch.inference_mode():
                assert torch.equal(bits(x.clone()), plain(x.clone()))
            # other dtypes take ATen's op
            assert torch.equal(bits(values.clone()), plain(values.clone()))
    # NaN: one with the sign bit clear stays NaN; one with it set becomes 0 (documented)
    nan = torch.tensor([float("nan")]).bfloat16()
    positive, negative = nan.view(torch.int16) & 0x7FFF, nan.view(torch.int16) | -0x8000
    assert BitsReLU()(positive.view(torch.bfloat16)).isnan().all()
    assert BitsReLU()(negative.view(torch.bfloat16)).eq(0).all()


def _step(model: nn.Module, x: torch.Tensor, bf16: bool = True) -> list[torch.Tensor]:
    """The output of one forward (under bf16 autocast with ``bf16``) and every parameter's gradient after its
    backward."""
    torch.manual_seed(1)  # the same dropout mask for every model
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    out.float().pow(2).sum().backward()
    return [out, *(p.grad for p in model.parameters())]


def test_a_torchvision_model_with_relu_on_the_bits_trains_bit_for_bit_as_with_atens():
    torch.manual_seed(0)
    plain = mobilenet_v2(weights=None, num_classes=5).to(memory_format=torch.channels_last)
    bits = mobilenet_v2(weights=None, num_classes=5).to(memory_format=torch.channels_last)
    bits.load_state_dict(plain.state_dict())
    assert use_bits_relu(bits) == 35
    x = torch.randn(4, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(_step(plain, x), _step(bits, x), strict=True))


def test_relu_on_the_bits_is_on_for_cpu_bf16_training_only():
    on = resolve_runtime(SpeedConfig(precision="bf16"), "cpu")
    assert on.as_dict()["bf16_relu_bits"] is True  # recorded in run.json
    assert not resolve_runtime(SpeedConfig(precision="fp32"), "cpu").bf16_relu_bits
    assert not resolve_runtime(SpeedConfig(precision="bf16", bf16_relu_bits=False), "cpu").bf16_relu_bits
    model = prepare_training_model(mobilenet_v2(weights=None), on)
    assert sum(type(m) is BitsReLU6 for m in model.modules()) == 35


def test_relu6_from_its_output_trains_bit_for_bit_as_atens_without_copying_its_input():
    torch.manual_seed(0)
    plain = mobilenet_v2(weights=None, num_classes=5).to(memory_format=torch.channels_last)
    switched = mobilenet_v2(weights=None, num_classes=5).to(memory_format=torch.channels_last)
    switched.load_state_dict(plain.state_dict())
    assert use_relu6_from_output(switched) == 35
    # inputs at 0 and 6 exactly, and beyond: the gradient's edges
    x = torch.randn(4, 3, 48, 48).mul_(40).round_().clamp_(-8, 8).contiguous(memory_format=torch.channels_last)
    steps = zip(_step(plain, x, bf16=False), _step(switched, x, bf16=False), strict=True)
    assert all(torch.equal(a, b) for a, b in steps)

    def clones(model: nn.Module) -> int:
        with torch.profiler.profile() as prof:
            model(x).sum().backward()
        return sum(e.name == "aten::clone" for e in prof.events())

    assert clones(plain) >= 35 and clones(switched) < clones(plain) - 34  # ATen copies each ReLU6's input
    with torch.no_grad():  # inference takes the plain op
        assert torch.equal(ReLU6FromOutput(inplace=True)(x.clone()), nn.ReLU6(inplace=True)(x.clone()))


def test_relu6_from_its_output_is_on_for_cpu_training_without_compile():
    on = resolve_runtime(SpeedConfig(precision="fp32"), "cpu")
    assert on.as_dict()["relu6_from_output"] is True  # recorded in run.json
    assert not resolve_runtime(SpeedConfig(compile=True), "cpu").relu6_from_output
    assert not resolve_runtime(SpeedConfig(relu6_from_output=False), "cpu").relu6_from_output
    model = prepare_training_model(mobilenet_v2(weights=None), on)
    assert sum(type(m) is ReLU6FromOutput for m in model.modules()) == 35
    bf16 = prepare_training_model(mobilenet_v2(weights=None), resolve_runtime(SpeedConfig(precision="bf16"), "cpu"))
    assert sum(type(m) is BitsReLU6 for m in bf16.modules()) == 35  # which does the same on fp32 tensors


@pytest.mark.parametrize(
    ("build", "blocks", "kind"), [(resnet18, 8, OutOfPlaceBasicBlock), (resnet50, 16, OutOfPlaceBottleneck)]
)
def test_resnet_blocks_adding_out_of_place_train_bit_for_bit_as_torchvisions(build, blocks, kind):
    torch.manual_seed(0)
    plain = build(weights=None, num_classes=5).to(memory_format=torch.channels_last)
    switched = build(weights=None, num_classes=5).to(memory_format=torch.channels_last)
    switched.load_state_dict(plain.state_dict())
    keys = list(switched.state_dict())
    assert use_out_of_place_residuals(switched) == blocks
    assert list(switched.state_dict()) == keys and sum(type(m) is kind for m in switched.modules()) == blocks
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(_step(plain, x), _step(switched, x), strict=True))


def test_out_of_place_residuals_are_on_for_cpu_bf16_training_only():
    assert resolve_runtime(SpeedConfig(precision="bf16"), "cpu").as_dict()["bf16_out_of_place_residuals"] is True
    assert not resolve_runtime(SpeedConfig(precision="fp32"), "cpu").bf16_out_of_place_residuals
    off = SpeedConfig(precision="bf16", bf16_out_of_place_residuals=False)
    assert not resolve_runtime(off, "cpu").bf16_out_of_place_residuals


def _ops(module: nn.Module, x: torch.Tensor) -> Counter[str]:
    """How often one bf16 training forward + backward of ``module`` on ``x`` ran each op."""
    leaf = x.detach().clone().requires_grad_()
    with torch.profiler.profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        module(leaf.clone()).float().sum().backward()  # a clone: the in-place modules may not write a leaf
    return Counter(e.name for e in prof.events())


def _switched(cls: type[nn.Module], plain: nn.Module) -> nn.Module:
    plain.__class__ = cls
    return plain.to(memory_format=torch.channels_last)


# (switch, the switched module, its input, an op the work-around runs more often, one the plain module runs more)
_SWITCHES = [
    (
        "DEPTHWISE_FP32_INPUT_GRAD",
        lambda: _switched(DepthwiseConvFp32InputGrad, nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)),
        torch.randn(2, 8, 12, 12),
        "aten::conv_transpose2d",
        None,
    ),
    ("BITS_RELU", lambda: BitsReLU(), torch.randn(2, 8, 12, 12).bfloat16(), "aten::clamp", "aten::relu"),
    (
        "RELU6_FROM_OUTPUT",
        lambda: ReLU6FromOutput(inplace=True),
        torch.randn(2, 8, 6, 6),
        "_ClampFromOutput",
        "aten::hardtanh_",
    ),
    (
        "OUT_OF_PLACE_RESIDUALS",
        lambda: _switched(OutOfPlaceBasicBlock, resnet18(weights=None).layer1[0]).eval(),  # BatchNorm counts with add_
        torch.randn(2, 64, 8, 8),
        "aten::add",
        "aten::add_",
    ),
    ("COMPILED_PRELU", lambda: _switched(CompiledPReLU, nn.PReLU(8)), torch.randn(2, 8, 6, 6), None, "aten::prelu"),
    ("DROPOUT_FROM_BITS", lambda: BitsDropout(0.4), torch.randn(2, 8, 6, 6), "aten::random_", "aten::bernoulli_"),
]


@pytest.mark.parametrize(
    ("switch", "build", "x", "work_around_op", "plain_op"), _SWITCHES, ids=[s[0] for s in _SWITCHES]
)
def test_each_work_around_has_a_switch_that_sends_its_modules_down_the_plain_path(
    monkeypatch, switch, build, x, work_around_op, plain_op
):
    """benchmarks/ab_steps.py times a training run with each switch on and off, per CPU kind."""
    from facecls.runtime import cpu_kernels

    module, x = build(), x.contiguous(memory_format=torch.channels_last)
    on = _ops(module, x)
    monkeypatch.setattr(cpu_kernels, switch, False)
    off = _ops(module, x)
    if work_around_op:
        assert on[work_around_op] > off[work_around_op]
    if plain_op:
        assert off[plain_op] > on[plain_op]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.4, 0.5])
def test_dropout_from_bits_drops_at_p_and_scales_and_backpropagates_as_atens(dtype, p):
    x = torch.ones(64, 512, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(0)
    out = BitsDropout(p)(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    # 1.6 million draws: the dropped share's standard deviation is under 0.0004
    assert abs(out.eq(0).double().mean().item() - p) < 0.003
    aten = nn.functional.dropout(x.detach(), p, training=True)
    assert out.unique().tolist() == aten.unique().tolist() == [0.0, aten.max().item()]  # ATen's scale, in dtype
    out.backward(torch.full_like(out, 2.0))
    assert torch.equal(x.grad, out.detach() * 2)  # the gradient goes through the same mask
    torch.manual_seed(0)
    assert torch.equal(BitsDropout(p)(x), out)  # the seed decides the mask
    assert not torch.equal(BitsDropout(p)(x), out)


def test_dropout_from_bits_leaves_inference_and_other_layouts_to_aten():
    layer = BitsDropout(0.4)
    x = torch.randn(8, 32, 10, 10)
    assert torch.equal(layer.eval()(x), x)  # inference: no dropout
    layer.train()
    sliced = x[:, :, 1:-1]  # not dense: ATen's op, which still drops
    torch.manual_seed(1)
    out = layer(sliced)
    torch.manual_seed(1)
    assert torch.equal(out, nn.functional.dropout(sliced, 0.4, training=True))
    assert torch.equal(BitsDropout(0.0)(x), x) and BitsDropout(1.0)(x).eq(0).all()


def test_dropout_from_bits_is_on_for_cpu_training_on_cpus_not_intels(monkeypatch):
    from facecls.runtime import speed

    for vendor, on in (("AuthenticAMD", True), ("GenuineIntel", False), ("unknown", True)):
        monkeypatch.setattr(speed, "cpu_info", lambda vendor=vendor: {"vendor": vendor, "kind": "avx512_bf16"})
        runtime = resolve_runtime(SpeedConfig(), "cpu")
        assert runtime.as_dict()["dropout_from_bits"] is on  # recorded in run.json
    assert resolve_runtime(SpeedConfig(dropout_from_bits=True), "cpu").dropout_from_bits
    assert not resolve_runtime(SpeedConfig(dropout_from_bits=True, compile=True), "cpu").dropout_from_bits
    assert not resolve_runtime(SpeedConfig(dropout_from_bits=False), "cpu").dropout_from_bits
    on = resolve_runtime(SpeedConfig(dropout_from_bits=True), "cpu")
    model = prepare_training_model(mobilenet_v2(weights=None), on)
    assert [type(m) for m in model.modules() if isinstance(m, nn.Dropout)] == [BitsDropout]
    assert use_dropout_from_bits(nn.Sequential(nn.Dropout(0.2), nn.Dropout2d(0.2))) == 1  # Dropout2d drops channels

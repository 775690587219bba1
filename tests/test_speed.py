"""Speed settings resolved from the recipe and the machine."""

import os

import pytest
import torch
import torch.nn.functional as F
from tolerances import FP32_U, sum_rtol

from facecls.config import SpeedConfig
from facecls.runtime.speed import (
    COMPILE_INFERENCE_MIN_IMAGES,
    CompiledInference,
    fold_batchnorm,
    resolve_runtime,
    use_compiled_inference,
)


def test_cpu_threads_and_workers_never_oversubscribe(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    runtime = resolve_runtime(SpeedConfig(), "cpu")
    assert runtime.threads >= 1
    assert runtime.threads + runtime.workers <= max(cores, 1 + runtime.workers)


@pytest.mark.parametrize("cores, processes, workers", [(16, "1", 15), (16, "2", 7), (64, "1", 16), (1, "1", 1)])
def test_gpu_runs_give_the_loader_every_core_but_the_main_process(monkeypatch, cores, processes, workers):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr("facecls.runtime.speed.available_cpus", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    runtime = resolve_runtime(SpeedConfig(), "cuda:0")
    assert (runtime.workers, runtime.precision, runtime.pin_memory) == (workers, "bf16", True)


def test_speed_threads_and_workers_come_from_the_recipe():
    runtime = resolve_runtime(SpeedConfig(threads=3, workers=0), "cpu")
    assert (runtime.threads, runtime.workers) == (3, 0)
    assert runtime.as_dict()["threads"] == 3  # recorded in run.json
    with pytest.raises(ValueError, match="speed.threads"):
        SpeedConfig(threads=0)


class _ConvBn(torch.nn.Module):
    def __init__(self, reuse_conv_output: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.reuse = reuse_conv_output

    def forward(self, x):
        y = self.conv(x)
        out = torch.relu(self.bn(y))
        return out + y if self.reuse else out


@pytest.mark.parametrize("reuse", [False, True])
def test_fold_batchnorm_only_where_it_changes_nothing(reuse):
    torch.manual_seed(0)
    model = _ConvBn(reuse)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 10, 10) * 3 + 1)  # non-trivial running statistics
    model.eval()
    folded = fold_batchnorm(model, input_size=10)
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        if reuse:
            assert torch.equal(folded(x), model(x))  # not folded: the same computation
        else:
            # Folding rescales the weights, so each output is a 27-term dot product (plus the bias) rounded
            # another way: off by at most 28 float32 roundings of its terms' magnitudes, scaled by the
            # BatchNorm factor |gamma| / sqrt(var + eps) (twice: before and after folding).
            scale = (model.bn.weight.abs() / (model.bn.running_var + model.bn.eps).sqrt()).view(1, -1, 1, 1)
            magnitudes = F.conv2d(x.abs(), model.conv.weight.abs(), model.conv.bias.abs(), padding=1) * scale
            bound = 2 * sum_rtol(28) * (magnitudes + (model.bn.running_mean.abs().view(1, -1, 1, 1) * scale))
            assert ((folded(x) - model(x)).abs() <= bound + model.bn.bias.abs().view(1, -1, 1, 1) * FP32_U).all()
    assert isinstance(model.bn, torch.nn.BatchNorm2d)  # the original is never modified
    # folding the BatchNorm would also change what the residual sees: refused
    assert (folded is model) == reuse
    if not reuse:
        assert isinstance(folded.bn, torch.nn.Identity)


def test_fold_batchnorm_folds_linear_into_batchnorm1d():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        head.train()(torch.randn(16, 6) * 3 + 1)  # non-trivial running statistics
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)
    folded = fold_batchnorm(model.eval(), input_size=8)
    assert isinstance(folded[3][1], torch.nn.Identity) and isinstance(model[3][1], torch.nn.BatchNorm1d)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def test_compiled_inference_matches_eager_including_a_smaller_last_batch():
    net = _small_net()
    compiled = CompiledInference(net, batch_size=8)
    x = torch.randn(13, 3, 16, 16)
    with torch.inference_mode():
        outputs = [compiled(x[:8]), compiled(x[8:])]  # the second batch (5) runs eagerly
        expected = net(x)
    assert compiled.failure is None
    got = torch.cat(outputs)
    assert got.shape == (13, 5)
    # Inductor fuses and may reorder every reduction: 27-term convolutions, a 256-pixel mean and an
    # 8-term linear layer, so at most (27 + 256 + 8) * 2^-24 ~ 1.7e-5 of the terms' magnitudes (a few
    # units here) apart; 1e-4 covers that and is far below any real mistake.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_compiled_inference_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken(*args, **kwargs):
        def run(_x):
            raise RuntimeError("no C++ compiler found\nlong details")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    net = _small_net()
    compiled = CompiledInference(net, batch_size=4)
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        got = compiled(x)
        again = compiled(x)
        expected = net(x)
    assert compiled.failure == "RuntimeError: no C++ compiler found"
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(again, expected)


def test_compiled_inference_is_on_for_large_jobs_unless_the_recipe_says():
    auto = resolve_runtime(SpeedConfig())
    assert not use_compiled_inference(auto, COMPILE_INFERENCE_MIN_IMAGES - 1)
    assert use_compiled_inference(auto, COMPILE_INFERENCE_MIN_IMAGES)
    assert not use_compiled_inference(resolve_runtime(SpeedConfig(compile_inference=False)), 10**6)
    assert use_compiled_inference(resolve_runtime(SpeedConfig(compile_inference=True)), 1)


@pytest.mark.parametrize(
    ("vendor", "model", "flags", "kind"),
    [
        ("AuthenticAMD", "AMD EPYC 9B14 96-Core Processor", "fpu avx2 avx512f avx512_bf16", "avx512_bf16"),
        ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8481C", "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
        ("HygonGenuine", "Some CPU", "fpu sse2 avx2", "other"),
    ],
)
def test_cpu_kind_comes_from_the_isa_flags(tmp_path, vendor, model, flags, kind):
    from facecls.runtime.machine import cpu_info

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
    )
    info = cpu_info(str(cpuinfo))
    assert info["vendor"] == vendor and info["model"] == model and info["kind"] == kind
    assert set(info["flags"]) <= set(flags.split()) and ("avx2" in info["flags"])

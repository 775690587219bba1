"""Speed settings resolved from the recipe and the machine."""

import os

import pytest
import torch

from facecls.config import SpeedConfig
from facecls.speed import fold_batchnorm, resolve_runtime


def test_cpu_threads_and_workers_never_oversubscribe(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    runtime = resolve_runtime(SpeedConfig(), "cpu")
    assert runtime.threads >= 1
    assert runtime.threads + runtime.workers <= max(cores, 1 + runtime.workers)


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
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert isinstance(model.bn, torch.nn.BatchNorm2d)  # the original is never modified
    # folding the BatchNorm would also change what the residual sees: refused
    assert (folded is model) == reuse
    if not reuse:
        assert isinstance(folded.bn, torch.nn.Identity)

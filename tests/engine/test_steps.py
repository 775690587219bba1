"""The training step loop's own measurements: how long it waited for its batches."""

import time

import torch
from torch import nn

from facecls.config import SpeedConfig
from facecls.engine.steps import RunningStats, StepContext, train_one_epoch
from facecls.runtime.speed import resolve_runtime


class SlowLoader:
    """Batches that take ``delay`` seconds each to arrive, as from a loader slower than the model."""

    def __init__(self, batches, delay: float):
        self.batches, self.delay = batches, delay

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def _epoch(loader, max_steps=None) -> RunningStats:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    runtime = resolve_runtime(SpeedConfig(precision="fp32", channels_last=False), "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss()
    ctx = StepContext(optimizer, loss, runtime, nn.Identity(), runtime.grad_scaler(), max_steps=max_steps)
    return train_one_epoch(model, loader, ctx, RunningStats())


def _batches(n: int):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 3, (4,), generator=gen), None) for _ in range(n)]


def test_the_epoch_counts_the_time_it_waited_for_the_loader():
    batches = _batches(5)
    slow = _epoch(SlowLoader(batches, delay=0.05))
    assert slow.count == 20
    assert slow.data_wait_s >= 5 * 0.05  # every batch's delay was spent waiting
    fast = _epoch(batches)  # a list: nothing to wait for
    assert fast.data_wait_s < 0.05 < slow.data_wait_s
    # The batch fetched after the last allowed step is not trained on, but its wait was real.
    stopped = _epoch(SlowLoader(batches, delay=0.05), max_steps=2)
    assert stopped.count == 8 and stopped.data_wait_s >= 3 * 0.05

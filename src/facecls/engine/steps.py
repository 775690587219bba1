"""The training and evaluation loops: small functions with explicit arguments, no argparse here."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from facecls.runtime.distributed import DistEnv, all_reduce_sum, broadcast_buffers, gather_objects
from facecls.runtime.speed import Runtime


@dataclass
class RunningStats:
    """Sums over the samples seen so far in an epoch (kept in checkpoints for exact resume)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    images_per_s: float = 0.0
    data_wait_s: float = 0.0
    """Seconds this process's loop waited for the loader's next batch (since the epoch's start or resume):
    where it is a large share of the epoch, the loader, not the model, sets the speed."""

    def add(self, loss_sum: float, correct: int, count: int) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.count += count

    def reduced(self, env: DistEnv) -> RunningStats:
        loss_sum, correct, count = all_reduce_sum(env, [self.loss_sum, self.correct, self.count])
        return RunningStats(loss_sum, correct, count, self.images_per_s, self.data_wait_s)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1.0, self.count)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1.0, self.count)


@dataclass
class StepContext:
    """What a training epoch needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    runtime: Runtime
    normalize: nn.Module
    scaler: torch.amp.GradScaler
    grad_accum: int = 1
    max_steps: int | None = None
    pass_labels: bool = False
    """Call ``model(x, labels)``: a margin head (arcface, cosface) needs the labels in training."""
    after_step: Callable[[int, RunningStats], None] = field(default=lambda step, stats: None)


def _micro_batches(loader, grad_accum: int):
    """Group the loader's batches into optimizer steps of ``grad_accum`` micro-batches."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(
    model: nn.Module, loader, ctx: StepContext, stats: RunningStats, start_step: int = 0
) -> RunningStats:
    """Train over ``loader`` (already positioned at ``start_step``); returns this process's sums."""
    model.train()
    step = start_step
    seen, started = 0, time.perf_counter()
    groups = _micro_batches(loader, ctx.grad_accum)
    while True:
        waiting = time.perf_counter()
        group = next(groups, None)
        stats.data_wait_s += time.perf_counter() - waiting
        if group is None or (ctx.max_steps is not None and step >= ctx.max_steps):
            break
        ctx.optimizer.zero_grad(set_to_none=True)
        total = sum(len(labels) for _, labels, _ in group)
        for i, (images, labels, _) in enumerate(group):
            labels = labels.to(ctx.runtime.device, non_blocking=True)
            x = ctx.normalize(images)
            sync = contextlib.nullcontext()
            if i < len(group) - 1 and hasattr(model, "no_sync"):
                sync = model.no_sync()
            with sync:
                with ctx.runtime.autocast():
                    logits = model(x, labels) if ctx.pass_labels else model(x)
                loss = ctx.criterion(logits.float(), labels)
                ctx.scaler.scale(loss * (len(labels) / total)).backward()
            with torch.no_grad():
                stats.add(float(loss) * len(labels), int((logits.argmax(1) == labels).sum()), len(labels))
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        step += 1
        seen += total
        stats.images_per_s = seen / max(1e-9, time.perf_counter() - started)
        ctx.after_step(step, stats)
    return stats


@dataclass
class Predictions:
    """Per-sample evaluation results, in dataset index order."""

    indices: np.ndarray
    labels: np.ndarray
    top5: np.ndarray
    losses: np.ndarray
    top5_scores: np.ndarray
    """softmax probabilities of the ``top5`` classes (0 where fewer than 5 classes pad ``top5``)"""

    def metrics(self, num_classes: int) -> dict:
        n = len(self.indices)
        top1 = self.top5[:, 0] == self.labels
        top5 = (self.top5 == self.labels[:, None]).any(axis=1)
        return {
            "count": int(n),
            "top1": float(top1.mean()) if n else 0.0,
            "top5": float(top5.mean()) if n else 0.0,
            "loss": float(self.losses.astype(np.float64).sum() / max(1, n)),
        }


@torch.inference_mode()
def evaluate(model: nn.Module, loader, runtime: Runtime, normalize: nn.Module, env: DistEnv) -> Predictions:
    """Evaluate this process's shard, gather every shard on all processes, return per-sample results
    sorted by dataset index (each sample counted once: shards are not padded). Every process uses rank
    0's BatchNorm statistics, the ones its checkpoint holds."""
    broadcast_buffers(env, model)
    model.eval()
    parts = []
    for images, labels, indices in loader:
        x = normalize(images)
        with runtime.autocast():
            logits = model(x).float()
        labels_dev = labels.to(logits.device)
        losses = nn.functional.cross_entropy(logits, labels_dev, reduction="none")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        scores = logits.softmax(dim=1).gather(1, top)
        if k < 5:
            top = torch.cat([top, top[:, :1].expand(-1, 5 - k)], dim=1)
            scores = torch.cat([scores, scores.new_zeros(len(scores), 5 - k)], dim=1)
        parts.append((indices.numpy(), labels.numpy(), top.cpu().numpy(), losses.cpu().numpy(), scores.cpu().numpy()))
    if parts:
        local = [np.concatenate(column) for column in zip(*parts, strict=True)]
    else:
        local = [
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros((0, 5), np.int64),
            np.zeros(0, np.float32),
            np.zeros((0, 5), np.float32),
        ]
    gathered = gather_objects(env, local)
    arrays = [np.concatenate([g[j] for g in gathered]) for j in range(len(local))]
    order = np.argsort(arrays[0], kind="stable")
    return Predictions(*(a[order] for a in arrays))

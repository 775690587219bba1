"""The training loop: phases run epochs, callbacks do everything else (checkpoints, metrics, the
learning-rate schedule, stop requests), in the manner of insightface's arcface_torch and Lightning.

``Loop.fit`` runs each phase until it is done; a phase trains one epoch at a time; after each epoch the
loop evaluates, updates its state and hands an :class:`EpochEnd` to the callbacks. A new kind of phase
(another way to train an epoch) or a new callback plugs in without touching either."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from facecls.config import TrainConfig, recipe_to_dict
from facecls.core.checkpoint import load_model_state, rng_state, set_rng_state
from facecls.core.console import Console
from facecls.core.download import cache_dir
from facecls.core.errors import Stopped, first_line
from facecls.core.run_folder import RunFolder
from facecls.data.pipeline import stop_workers
from facecls.engine.builder import TrainingSetup, finetune_epochs, set_phase, uses_stored_features
from facecls.engine.steps import RunningStats, StepContext, evaluate, train_one_epoch
from facecls.runtime import conv_gemm
from facecls.runtime.distributed import all_reduce_sum, barrier


@dataclass
class LoopState:
    """Where training stands; every checkpoint holds it."""

    epoch: int = 0
    """Epochs done."""
    step_in_epoch: int = 0
    """Optimizer steps done in the current epoch."""
    global_step: int = 0
    best_val_acc: float = -1.0
    best_val_loss: float = math.inf
    """The monitored loss at the best epoch: equal top-1 at a lower loss counts as better."""
    best_phase: str = ""
    """The phase of the best epoch."""
    partial: RunningStats = field(default_factory=RunningStats)
    """Sums over the current epoch's steps before the checkpoint (a resumed epoch counts them too)."""
    stop_requested: bool = False


@dataclass
class EpochEnd:
    """What a finished epoch produced (``state.epoch`` already counts it)."""

    phase: str
    train: RunningStats
    """Summed over all processes."""
    val: dict | None
    monitor: float
    """Validation top-1 (training accuracy without a validation split): what the best checkpoint and the
    plateau schedule follow."""
    monitor_loss: float
    """Validation loss (training loss without a validation split): breaks ties of ``monitor``."""
    lr: float
    """The learning rate the epoch trained with."""
    seconds: float
    improved: bool


class Callback:
    """Hooks on the loop; each does nothing unless overridden."""

    def on_fit_start(self, loop: Loop) -> None: ...

    def on_step_end(self, loop: Loop, step: int, steps: int, running: RunningStats) -> None: ...

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None: ...

    def on_fit_end(self, loop: Loop) -> None:
        """Always called, also when training stops with an error."""


class Phase:
    """A stretch of epochs trained one way. ``enter`` prepares the model (which parameters train, the
    DDP wrapper) and returns what the steps call; ``train_epoch`` trains one epoch and returns this
    epoch's sums over all processes (``loop.state.epoch`` is the epoch's index); ``validate`` gives the
    epoch's validation metrics (by default: the model on the validation loader)."""

    name: str
    short_epochs: bool = False
    """Epochs take a fraction of a second (checkpoints are written every so often, not every epoch)."""

    def done(self, loop: Loop) -> bool:
        raise NotImplementedError

    def enter(self, loop: Loop) -> nn.Module:
        raise NotImplementedError

    def train_epoch(self, loop: Loop, model: nn.Module) -> RunningStats:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What the phase must carry over a resume besides the loop's state (checkpoints hold it under
        ``phases``, by phase name; plain values and tensors only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned ({} from a checkpoint without it)."""

    def planned_end(self) -> int | None:
        """The epoch count at which this phase ends, as far as known (None: it does not say)."""
        return None

    def record(self, loop: Loop, end: EpochEnd) -> None:
        """Called after each of its epochs, before the callbacks (a phase that ends on its own record)."""

    def validate(self, loop: Loop) -> dict | None:
        """``count``, ``top1``, ``top5``, ``loss`` on the validation split (None: the run has none)."""
        s = loop.setup
        if s.val_loader is None:
            return None
        return evaluate(loop.model, s.val_loader, s.runtime, s.normalize, s.env).metrics(len(s.class_names))


class Loop:
    """Runs ``phases`` over a built run (:class:`TrainingSetup`), calling ``callbacks`` in order."""

    def __init__(
        self,
        setup: TrainingSetup,
        phases: list[Phase],
        callbacks: list[Callback],
        console: Console | None = None,
        state: LoopState | None = None,
        resume_hint: str = "`facecls train --resume RUN`",
    ):
        self.setup, self.phases, self.callbacks = setup, phases, callbacks
        self.console = console or Console(enabled=False)
        self.state = state or LoopState()
        self.model: nn.Module = setup.model
        self.phase: Phase | None = None
        """The phase training now."""
        self.resume_hint = resume_hint
        self.plans_adopted = False
        """The convolution plans came from a checkpoint (speed.conv_gemm)."""

    def planned_epochs(self) -> int:
        """Epochs of the whole run as far as known (a phase that ends on its own counts its cap until then)."""
        ends = [end for phase in self.phases if (end := phase.planned_end()) is not None]
        return max(ends, default=self.setup.recipe.train.epochs)

    def finished(self) -> bool:
        """Every phase is done: training is over."""
        return all(phase.done(self) for phase in self.phases)

    def fit(self) -> LoopState:
        self._start()
        try:
            for callback in self.callbacks:
                callback.on_fit_start(self)
            for phase in self.phases:
                if phase.done(self):
                    continue
                self.phase = phase
                model = phase.enter(self)
                while not phase.done(self):
                    started = time.perf_counter()
                    train = self._train_epoch(phase, model)
                    self._end_epoch(phase, train, time.perf_counter() - started)
        finally:
            for callback in self.callbacks:
                callback.on_fit_end(self)
            stop_workers(self.setup.train_loader)
        return self.state

    def _start(self) -> None:
        s, t = self.setup, self.setup.recipe.train
        if s.env.enabled and self.state.step_in_epoch == 0 and self.state.epoch == 0:
            torch.manual_seed(t.seed + s.env.rank)  # ranks draw different dropout masks
        if s.runtime.conv_gemm and not self.plans_adopted and not self.finished() and finetune_epochs(t) > 0:
            self._measure_conv_plans()
        if s.runtime.compile:
            self.model = torch.compile(self.model)
        if not self.finished():
            fitted = getattr(getattr(self.model, "_orig_mod", self.model).head, "fits_without_gradients", False)
            head = (
                f"{s.recipe.model.head.kind} head fitted once on stored features ({t.feature_views} view(s)), "
                if uses_stored_features(t) and fitted
                else f"head on stored features ({t.feature_views} view(s)) until validation stops improving, "
                if uses_stored_features(t)
                else f"{t.frozen_epochs} frozen, "
            )
            self.console.log(
                f"training {s.recipe.name}: {head}up to {self.planned_epochs()} epochs, "
                f"{s.steps_per_epoch} image steps/epoch, batch {t.batch_size} = {s.env.world_size} process(es) x "
                f"{s.micro_batch} x {t.grad_accum} accumulation; {s.runtime.device}, {s.runtime.precision}"
                f"{', channels_last' if s.runtime.channels_last else ''}"
            )

    def _measure_conv_plans(self) -> None:
        """The plans of each convolution shape (speed.conv_gemm): those this machine measured for earlier
        runs, the rest timed now, before the first step, so that every checkpoint holds them."""
        s = self.setup
        plans_file = conv_gemm.machine_plans_file(cache_dir())
        conv_gemm.load_plans_file(plans_file)
        size = s.preprocess.input_size
        example = torch.zeros(s.micro_batch, 3, size, size, device=s.runtime.device)
        started = time.perf_counter()
        plans, measured = conv_gemm.measure_model_plans(
            self.model, example.contiguous(memory_format=torch.channels_last), s.runtime.autocast()
        )
        if not measured:
            return
        gemm = sum(plan.any_gemm for plan in plans.values())
        self.console.log(
            f"{measured} convolution shapes timed in {time.perf_counter() - started:.1f} s; {gemm} of the model's "
            f"{len(plans)} train faster with matrix products for some of their products "
            "(speed.conv_gemm=false: oneDNN's kernels only)"
        )
        try:
            conv_gemm.save_plans_file(plans_file)
        except OSError as exc:
            self.console.warn(
                f"could not keep the convolution plans in {plans_file} ({first_line(exc)}); "
                "later runs will time them again"
            )

    def _train_epoch(self, phase: Phase, model: nn.Module) -> RunningStats:
        try:
            return phase.train_epoch(self, model)
        except KeyboardInterrupt:
            # Under torchrun nothing is saved here: the processes may be at different points, and a
            # collective (or a checkpoint off by one step) would be wrong. The last checkpoint stands.
            raise Stopped(f"interrupted; resume from the last checkpoint with {self.resume_hint}", 130) from None

    def _end_epoch(self, phase: Phase, train: RunningStats, seconds: float) -> None:
        s, state = self.setup, self.state
        val_metrics = phase.validate(self)
        monitor = val_metrics["top1"] if val_metrics else train.accuracy
        monitor_loss = val_metrics["loss"] if val_metrics else train.loss
        lr = s.optimizer.param_groups[0]["lr"]
        state.epoch += 1
        state.step_in_epoch = 0
        # Equal top-1 at a lower loss counts too: a small validation set reaches 100% long before the head
        # has converged, and the first epoch at 100% would otherwise stay the best checkpoint.
        tie = monitor == state.best_val_acc and monitor_loss < state.best_val_loss
        improved = monitor > state.best_val_acc or tie
        if improved:
            state.best_val_acc, state.best_val_loss, state.best_phase = monitor, monitor_loss, phase.name
        end = EpochEnd(phase.name, train, val_metrics, monitor, monitor_loss, lr, seconds, improved)
        phase.record(self, end)
        for callback in self.callbacks:
            callback.on_epoch_end(self, end)

    def step_end(self, step: int, steps: int, running: RunningStats) -> None:
        """Called by a phase after each optimizer step."""
        self.state.step_in_epoch = step
        self.state.global_step += 1
        for callback in self.callbacks:
            callback.on_step_end(self, step, steps, running)

    def wrap(self, module: nn.Module | None = None) -> nn.Module:
        """What the steps call (``module``, by default the model): DDP around it under torchrun. Wrapped
        anew for each phase, because DDP fixes the parameters it synchronises when it is constructed."""
        s, module = self.setup, self.model if module is None else module
        if not s.env.enabled:
            return module
        device_ids = [s.env.local_rank] if s.runtime.device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    # ---- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self, running: RunningStats | None = None) -> dict:
        """The checkpoint: model, optimizer, scheduler, scaler, loop state, RNG states and the run's
        identity (recipe, classes, split, preprocessing). ``running``: the sums of a mid-epoch save."""
        s, state = self.setup, self.state
        return {
            "model": getattr(self.model, "_orig_mod", self.model).state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict() if s.scheduler is not None else None,
            "scaler": s.scaler.state_dict(),
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "partial": [running.loss_sum, running.correct, running.count] if running else [0.0, 0.0, 0.0],
            "best_val_acc": state.best_val_acc,
            "best_val_loss": state.best_val_loss,
            "phase": self.phase.name if self.phase is not None else None,
            "best_phase": state.best_phase,
            "rng": rng_state(),
            "config": recipe_to_dict(s.recipe),
            "class_names": s.class_names,
            "manifest_sha256": s.data.manifest_sha256,
            "model_name": s.recipe.model.name,
            "preprocess": s.preprocess.as_dict(),
            "world_size": s.env.world_size,
            "phases": {phase.name: phase.state_dict() for phase in self.phases},
            "conv_plans": conv_gemm.export_plans(),
        }

    def load_state_dict(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Continue exactly where ``checkpoint`` (written by :meth:`state_dict`) left off; call before
        :meth:`fit`."""
        s = self.setup
        load_model_state(s.model, checkpoint["model"], source)
        s.optimizer.load_state_dict(checkpoint["optimizer"])
        if s.scheduler is not None and checkpoint["scheduler"] is not None:
            s.scheduler.load_state_dict(checkpoint["scheduler"])
        s.scaler.load_state_dict(checkpoint["scaler"])
        self.state = LoopState(
            epoch=int(checkpoint["epoch"]),
            step_in_epoch=int(checkpoint["step_in_epoch"]),
            global_step=int(checkpoint["global_step"]),
            best_val_acc=float(checkpoint["best_val_acc"]),
            best_val_loss=float(checkpoint.get("best_val_loss", math.inf)),
            best_phase=str(checkpoint.get("best_phase") or ""),
            partial=RunningStats(*checkpoint["partial"]) if s.env.is_main else RunningStats(),
        )
        for phase in self.phases:
            phase.load_state_dict(checkpoint.get("phases", {}).get(phase.name, {}))
        set_rng_state(checkpoint["rng"])
        self.plans_adopted = conv_gemm.adopt_plans(checkpoint.get("conv_plans", [])) > 0
        if s.env.enabled:  # ranks draw different dropout masks
            torch.manual_seed(int(torch.initial_seed()) + s.env.rank)


# ---- phases ----------------------------------------------------------------------------------------
def _epoch_of_batches(loop: Loop, model: nn.Module, loader, normalize: nn.Module, steps: int) -> RunningStats:
    """One epoch of optimizer steps over ``loader`` (from the step a resumed run stopped at); returns its
    sums over all processes."""
    s, state, t = loop.setup, loop.state, loop.setup.recipe.train
    start = state.step_in_epoch
    loader.sampler.set_epoch(state.epoch, start * t.batch_size)
    stats, state.partial = state.partial, RunningStats()
    bar = loop.console.progress(f"epoch {state.epoch + 1}/{loop.planned_epochs()} ({loop.phase.name})", steps, start)

    def after_step(step: int, running: RunningStats) -> None:
        bar.update(step, f"loss {running.loss:.3f} acc {100 * running.accuracy:.1f}% {running.images_per_s:.0f} img/s")
        loop.step_end(step, steps, running)

    ctx = StepContext(
        s.optimizer,
        s.criterion,
        s.runtime,
        normalize,
        s.scaler,
        grad_accum=t.grad_accum,
        max_steps=steps,
        pass_labels=getattr(loop.model, "_orig_mod", loop.model).head.takes_labels,
        after_step=after_step,
    )
    try:
        train_one_epoch(model, loader, ctx, stats, start_step=start)
    finally:
        bar.close()
    return stats.reduced(s.env)


def _steps(loader, train: TrainConfig) -> int:
    """Optimizer steps per epoch over ``loader`` (at most train.max_steps_per_epoch)."""
    steps = math.ceil(loader.sampler.samples_per_epoch() / train.batch_size)
    return min(steps, train.max_steps_per_epoch or steps)


def _resolve(value: int | Callable[[], int]) -> int:
    return value() if callable(value) else value


class EpochPhase(Phase):
    """Epochs from ``start`` up to ``until`` over the training images: the head alone (``frozen``) or the
    recipe's unfrozen part of the backbone with it. Entering the fine-tuning phase at its first step
    switches the learning rate to ``optim.finetune_lr`` when the recipe sets one. ``start`` and ``until``
    may be functions, for a phase after one that ends on its own (default start: train.frozen_epochs)."""

    def __init__(
        self, name: str, until: int | Callable[[], int], frozen: bool, start: int | Callable[[], int] | None = None
    ):
        self.name, self.until, self.frozen, self.start = name, until, frozen, start

    def done(self, loop: Loop) -> bool:
        return loop.state.epoch >= _resolve(self.until)

    def planned_end(self) -> int:
        return _resolve(self.until)

    def enter(self, loop: Loop) -> nn.Module:
        recipe, state = loop.setup.recipe, loop.state
        set_phase(loop.model, self.frozen, recipe.train)
        model = loop.wrap()
        first = recipe.train.frozen_epochs if self.start is None else _resolve(self.start)
        starts_now = state.epoch == first and state.step_in_epoch == 0
        if not self.frozen and starts_now and recipe.optim.finetune_lr is not None:
            for group in loop.setup.optimizer.param_groups:
                group["lr"] = recipe.optim.finetune_lr
        return model

    def train_epoch(self, loop: Loop, model: nn.Module) -> RunningStats:
        s = loop.setup
        return _epoch_of_batches(loop, model, s.train_loader, s.normalize, s.steps_per_epoch)


LOSS_MIN_DELTA = 0.01
"""The stored-feature phase counts a lower validation loss at equal top-1 as progress from 1% lower."""


@dataclass
class HeadProgress:
    """Where the stored-feature phase stands (kept in checkpoints, so a resumed run continues it)."""

    epochs: int = 0
    best: float = -1.0
    best_loss: float = math.inf
    since_best: int = 0
    done: bool = False

    def record(self, monitor: float, loss: float, train: TrainConfig) -> None:
        """One more epoch; progress means a higher top-1, or the same top-1 at a loss at least
        ``LOSS_MIN_DELTA`` (relative) lower: a small validation set reaches 100% long before the head
        has converged, and after that the loss keeps creeping down by fractions of a percent for dozens
        of epochs as the plateau schedule shrinks the learning rate."""
        self.epochs += 1
        if monitor > self.best or (monitor == self.best and loss < self.best_loss * (1 - LOSS_MIN_DELTA)):
            self.best, self.best_loss, self.since_best = monitor, loss, 0
        else:
            self.since_best += 1
        self.done = self.since_best >= train.head_patience or self.epochs >= train.head_max_epochs


class StoredFeaturePhase(Phase):
    """The head alone on stored backbone features (train.feature_views views of each training image, the
    validation images as the model sees them), computed once with the backbone frozen and reused from
    the cache by later runs. Ends when validation stopped improving (train.head_patience epochs) or at
    train.head_max_epochs. A head without gradient steps (nearest mean, kNN) is fitted in one epoch."""

    name = "features"
    short_epochs = True

    def __init__(self, train: TrainConfig, fitted: bool = False):
        self.train, self.fitted = train, fitted  # fitted: the head fits in one epoch, without gradient steps
        self.progress = HeadProgress()
        self.best_head: dict | None = None
        """The head's state at the phase's best epoch so far (``best_epoch``)."""
        self.best_epoch = 0
        self.head: nn.Module | None = None
        self.loaders = None
        self.normalize: nn.Module | None = None

    def done(self, loop: Loop) -> bool:
        return self.progress.done

    def planned_end(self) -> int:
        if self.progress.done:
            return self.progress.epochs
        return 1 if self.fitted else self.train.head_max_epochs

    def enter(self, loop: Loop) -> nn.Module:
        from facecls.engine.features import ToDevice

        s = loop.setup
        set_phase(loop.model, True, s.recipe.train)
        self.head = getattr(loop.model, "_orig_mod", loop.model).head
        self.loaders = stored_feature_loaders(loop)
        self.normalize = ToDevice(s.runtime.device)
        return loop.wrap(self.head)

    def train_epoch(self, loop: Loop, model: nn.Module) -> RunningStats:
        train_loader = self.loaders[0]
        if self.head.fits_without_gradients:
            return self._fit_head(loop, train_loader.dataset)
        return _epoch_of_batches(loop, model, train_loader, self.normalize, _steps(train_loader, self.train))

    @torch.no_grad()
    def _fit_head(self, loop: Loop, stored) -> RunningStats:
        """Fit the head on every stored training feature; the returned stats are its loss and accuracy on
        the training images (their first view)."""
        device = loop.setup.runtime.device
        views, images, dim = stored.features.shape
        labels = torch.tensor(stored.labels, device=device)
        features = stored.features.reshape(views * images, dim).to(device)
        if getattr(self.head, "uses_validation", False) and self.loaders[1] is not None:
            val = self.loaders[1].dataset  # the validation features as the model sees them (1 x N x D)
            val_labels = torch.tensor(val.labels, device=device)
            self.head.fit(features, labels.repeat(views), val.features[0].to(device), val_labels)
        else:
            self.head.fit(features, labels.repeat(views))
        self.head.eval()
        stats = RunningStats()
        for start in range(0, images, 4096):  # bounded memory: a kNN query block is 4096 x gallery
            end = min(start + 4096, images)
            logits = self.head(features[start:end].float())
            target = labels[start:end]
            loss = nn.functional.cross_entropy(logits, target, reduction="sum")
            stats.add(float(loss), int((logits.argmax(1) == target).sum()), len(target))
        return stats.reduced(loop.setup.env)

    def validate(self, loop: Loop) -> dict | None:
        s, val_loader = loop.setup, self.loaders[1]
        if val_loader is None:
            return None
        return evaluate(self.head, val_loader, s.runtime, self.normalize, s.env).metrics(len(s.class_names))

    def record(self, loop: Loop, end: EpochEnd) -> None:
        self.progress.record(end.monitor, end.monitor_loss, self.train)
        self.progress.done |= self.head.fits_without_gradients  # a second fit changes nothing
        if end.improved and not self.head.fits_without_gradients:  # a fitted head has one epoch only
            self.best_head = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
            self.best_epoch = loop.state.epoch
        if self.progress.done and self.best_head is not None and self.best_epoch != loop.state.epoch:
            # What follows (fine-tuning, the final model) starts from the best head, not the last one.
            self.head.load_state_dict(self.best_head)
            loop.console.log(
                f"head phase over after {self.progress.epochs} epochs; its best is epoch {self.best_epoch}"
            )

    def state_dict(self) -> dict:
        return {**dataclasses.asdict(self.progress), "best_head": self.best_head, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.best_head, self.best_epoch = state.pop("best_head", None), state.pop("best_epoch", 0)
        self.progress = HeadProgress(**state)


def stored_feature_loaders(loop: Loop):
    """Loaders of the stored features of the training images (``train.feature_views`` views) and of the
    validation images (the image, and its mirror with flip TTA, averaged as the model does), computed once
    by rank 0 and reused from the cache afterwards."""
    from facecls.engine.embeddings import embedder_of
    from facecls.engine.features import (
        StoredFeatures,
        feature_eval_loader,
        feature_train_loader,
        flip_mean,
        shared_store,
    )

    s, t, env = loop.setup, loop.setup.recipe.train, loop.setup.env
    embedder = embedder_of(loop.model, s.preprocess, s.runtime, s.recipe.model.name)
    stored = {}
    flip_tta = getattr(loop.model, "_orig_mod", loop.model).flip_tta
    for split, views in (("train", t.feature_views), ("val", 2 if flip_tta else 1)):
        if split not in s.data.datasets:
            continue
        dataset = s.data.datasets[split]
        features, how = shared_store(
            embedder, dataset, views=views, seed=t.seed, env=env, batch_size=s.micro_batch * 2, console=loop.console
        )
        loop.console.log(f"{split} features: {len(dataset)} images x {views} view(s) {how}")
        if split == "val" and flip_tta:  # what the model computes with flip TTA: the mean over both views
            features = flip_mean(features)
        stored[split] = StoredFeatures(features, dataset.labels)
    train = feature_train_loader(stored["train"], s.micro_batch, t.seed, env.rank, env.world_size)
    if "val" not in stored:
        return train, None
    return train, feature_eval_loader(stored["val"], s.micro_batch * 2, env.rank, env.world_size)


def recipe_phases(setup: TrainingSetup) -> list[Phase]:
    """The recipe's schedule: the head alone (on stored features when uses_stored_features, else
    ``frozen_epochs`` over the images), then fine-tuning (none with train.unfreeze: none)."""
    t = setup.recipe.train
    finetune = finetune_epochs(t)
    if uses_stored_features(t):
        head = StoredFeaturePhase(t, fitted=getattr(setup.model.head, "fits_without_gradients", False))
        if not finetune:
            return [head]
        until = lambda: head.planned_end() + finetune  # noqa: E731 - known once the head phase has ended
        return [head, EpochPhase("finetune", until, frozen=False, start=lambda: head.progress.epochs)]
    if t.unfreeze == "none":
        return [EpochPhase("frozen", t.epochs, frozen=True)]
    return [EpochPhase("frozen", t.frozen_epochs, frozen=True), EpochPhase("finetune", t.epochs, frozen=False)]


def schedule_over(train: TrainConfig, checkpoint: dict) -> bool:
    """Whether the run that wrote ``checkpoint`` had trained every phase of its recipe."""
    if uses_stored_features(train):
        phase = StoredFeaturePhase(train)
        phase.load_state_dict(checkpoint.get("phases", {}).get(StoredFeaturePhase.name, {}))
        head = phase.progress
        finetune = finetune_epochs(train)
        return head.done and int(checkpoint["epoch"]) >= head.epochs + finetune
    return int(checkpoint["epoch"]) >= train.epochs


# ---- callbacks -------------------------------------------------------------------------------------
class SchedulerStep(Callback):
    """The learning-rate schedule steps once per epoch (a plateau schedule on the monitored accuracy)."""

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        scheduler = loop.setup.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(end.monitor)
        elif scheduler is not None:
            scheduler.step()


# An epoch of images that spent this share of its time waiting for the loader says so in its log line: the
# loader, not the model, set its speed (more speed.workers where there are cores for them).
LOADER_BOUND_PCT = 20.0


class MetricsLog(Callback):
    """Per epoch: a row of metrics.csv, the curves redrawn (main process), and a log line. The curves are
    redrawn at most every ``redraw_s`` seconds and at the end: drawing them takes longer (about 0.5 s)
    than a whole epoch of a head on stored features."""

    def __init__(self, folder: RunFolder, redraw_s: float = 20.0):
        self.folder, self.redraw_s = folder, redraw_s
        self.drawn_at = time.monotonic()
        self.pending = False

    def on_fit_end(self, loop: Loop) -> None:
        # Not while an error is on its way out (a full disk): the resume redraws them.
        if self.pending and loop.setup.env.is_main and sys.exc_info()[0] is None:
            self.folder.plot_curves()
        self.pending = False

    @staticmethod
    def _loader_bound(loop: Loop, row: dict) -> bool:
        # Not in a phase on stored features: its milliseconds-long epochs gather their batches in the main
        # process (no workers to add), so a large share there says nothing about the image loader.
        short = loop.phase is not None and loop.phase.short_epochs
        return row["data_wait_pct"] >= LOADER_BOUND_PCT and not short

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        val = end.val
        row = {
            "epoch": loop.state.epoch,
            "phase": end.phase,
            "train_loss": round(end.train.loss, 6),
            "train_acc": round(end.train.accuracy, 6),
            "val_loss": round(val["loss"], 6) if val else "",
            "val_acc": round(val["top1"], 6) if val else "",
            "val_top5": round(val["top5"], 6) if val else "",
            "lr": end.lr,
            "seconds": round(end.seconds, 2),
            "train_img_per_s": round(end.train.count / max(end.seconds, 1e-9), 2),
            "data_wait_pct": round(100 * end.train.data_wait_s / max(end.seconds, 1e-9), 1),
        }
        if loop.setup.env.is_main:
            now = time.monotonic()
            redraw = now - self.drawn_at >= self.redraw_s
            self.folder.append_metrics(row, redraw=redraw)
            self.pending = not redraw
            if redraw:
                self.drawn_at = now
        loop.console.log(
            f"epoch {loop.state.epoch}/{loop.planned_epochs()} ({end.phase})  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"
            + (f"  val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%" if val else "")
            + f"  lr {end.lr:.2e}  {row['train_img_per_s']:.1f} img/s"
            + (f" ({row['data_wait_pct']:.0f}% waiting for data)" if self._loader_bound(loop, row) else "")
            + ("  (best)" if end.improved else "")
        )


class Checkpoints(Callback):
    """last.ckpt after every epoch and every ``every`` steps (0: never mid-epoch), best.ckpt when the
    monitored accuracy improved; on a stop request, last.ckpt right at the step where training stops.

    In a phase of short epochs (``Phase.short_epochs``: a head on stored features, an epoch in
    milliseconds) writing the whole model twice an epoch would take most of the time, so there the
    epoch-end checkpoints are kept in memory and written at most every ``interval_s`` seconds, when the
    phase ends, on a stop request, and when training ends (also with an error: they are whole epochs).
    A crash loses at most ``interval_s`` seconds of such epochs; the resume drops their metrics rows."""

    def __init__(self, folder: RunFolder, every: int = 0, interval_s: float = 30.0):
        self.folder, self.every, self.interval_s = folder, every, interval_s
        self.pending: dict[str, dict] = {}
        self.pending_since = 0.0

    def save(self, loop: Loop, name: str, running: RunningStats | None = None) -> None:
        if loop.setup.env.is_main:
            self.folder.save_checkpoint(name, loop.state_dict(running))

    def flush(self, loop: Loop) -> None:
        pending, self.pending = self.pending, {}  # a failed write is not tried again at the fit's end
        if loop.setup.env.is_main:
            for name, state in pending.items():
                self.folder.save_checkpoint(name, state)

    def on_step_end(self, loop: Loop, step: int, steps: int, running: RunningStats) -> None:
        if step >= steps:  # the epoch's last step: its end saves
            return
        if loop.state.stop_requested or (self.every and step % self.every == 0):
            # A best.ckpt still held back must reach the disk first: the last.ckpt written now records that
            # epoch as the best, and a resume from it would never write it again.
            self.pending.pop("last.ckpt", None)
            self.flush(loop)
            self.save(loop, "last.ckpt", running.reduced(loop.setup.env))

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        phase = loop.phase
        if phase is None or not phase.short_epochs:
            if end.improved:
                self.save(loop, "best.ckpt")
            self.save(loop, "last.ckpt")
            barrier(loop.setup.env)
            return
        if not self.pending:
            self.pending_since = time.monotonic()
        # A copy: the state dict's tensors are the live parameters, which the next epoch changes.
        state = copy.deepcopy(loop.state_dict()) if loop.setup.env.is_main else {}
        if end.improved:
            self.pending["best.ckpt"] = state
        self.pending["last.ckpt"] = state
        due = time.monotonic() - self.pending_since >= self.interval_s
        if due or phase.done(loop) or loop.state.stop_requested:
            self.flush(loop)
        barrier(loop.setup.env)

    def on_fit_end(self, loop: Loop) -> None:
        if self.pending:
            self.flush(loop)


class StopOnSignal(Callback):
    """The first Ctrl-C (or SIGTERM) asks for a stop: the current optimizer step completes, last.ckpt is
    saved right there (Checkpoints, which must come after :attr:`agreement` and before this callback), so
    the resumed run is exactly the uninterrupted one, and training stops. A second Ctrl-C stops at once,
    keeping the last checkpoint.

    Under torchrun every process asks on its own: torchrun passes a Ctrl-C or SIGTERM it gets on to each
    worker (the workers run in sessions of their own, so the terminal's Ctrl-C reaches torchrun alone) and
    kills them after its --shutdown_timeout (30 s); a cluster's scheduler may signal every process itself.
    Each process is between different operations when its signal comes, so a flag alone would stop them
    at different steps, and the first to leave would leave the others waiting in a collective. So after
    every step, and at every epoch's end, the processes add up their requests in one all-reduce
    (:attr:`agreement`, a callback of its own that runs before Checkpoints): all stop at the same step,
    and rank 0 saves it."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.previous: dict = {}
        self.signal = signal.SIGINT
        self.requested = False
        """This process was asked to stop (under torchrun the processes agree before any acts on it)."""
        self.agreement = _AgreeOnStop(self)

    def on_fit_start(self, loop: Loop) -> None:
        loop.state.stop_requested = self.requested = False
        if threading.current_thread() is not threading.main_thread():
            return
        together = loop.setup.env.enabled

        def request_stop(signum, frame) -> None:
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not self.requested and loop.setup.env.is_main:
                again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
                name = signal.Signals(signum).name
                os.write(2, f"\n{name}: stopping after this step (saving a checkpoint){again}\n".encode())
            self.requested, self.signal = True, signum
            if not together:
                loop.state.stop_requested = True

        self.previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def agree(self, loop: Loop) -> None:
        """Under torchrun: stop when any process was asked to (SIGTERM's name when any got SIGTERM)."""
        if not loop.setup.env.enabled or loop.state.stop_requested:
            return
        asked, terminated = all_reduce_sum(
            loop.setup.env, [float(self.requested), float(self.requested and self.signal == signal.SIGTERM)]
        )
        if asked:
            loop.state.stop_requested = True
            self.signal = signal.SIGTERM if terminated else signal.SIGINT

    def on_fit_end(self, loop: Loop) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def on_step_end(self, loop: Loop, step: int, steps: int, running: RunningStats) -> None:
        if loop.state.stop_requested and step < steps:  # at the epoch's last step: stop after its end
            raise self.stopped(loop)

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        if loop.state.stop_requested and not loop.finished():
            raise self.stopped(loop)

    def stopped(self, loop: Loop) -> Stopped:
        state = loop.state
        where = f"epoch {state.epoch}"
        if state.step_in_epoch:
            where = f"epoch {state.epoch + 1}, step {state.step_in_epoch}"
        return Stopped(
            f"stopped ({signal.Signals(self.signal).name}) at the end of {where}; progress saved in "
            f"{self.folder.checkpoint('last')}: continue with `facecls train --resume {self.folder}`",
            128 + int(self.signal),
        )


class _AgreeOnStop(Callback):
    """:meth:`StopOnSignal.agree` after every step and at every epoch's end, before the checkpoint."""

    def __init__(self, stop: StopOnSignal):
        self.stop = stop

    def on_step_end(self, loop: Loop, step: int, steps: int, running: RunningStats) -> None:
        self.stop.agree(loop)

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        self.stop.agree(loop)


def run_callbacks(folder: RunFolder, setup: TrainingSetup) -> list[Callback]:
    """What ``facecls train`` hangs on the loop, in the order it must run."""
    every = setup.recipe.train.checkpoint_every
    stop = StopOnSignal(folder)
    return [SchedulerStep(), MetricsLog(folder), stop.agreement, Checkpoints(folder, every), stop]

"""The training loop: phases run epochs, callbacks do everything else (checkpoints, metrics, the
learning-rate schedule, stop requests), in the manner of insightface's arcface_torch and Lightning.

``Loop.fit`` runs each phase until it is done; a phase trains one epoch at a time; after each epoch the
loop evaluates, updates its state and hands an :class:`EpochEnd` to the callbacks. A new kind of phase
(another way to train an epoch) or a new callback plugs in without touching either."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from facecls.config import recipe_to_dict
from facecls.core.checkpoint import load_model_state, rng_state, set_rng_state
from facecls.core.console import Console
from facecls.core.errors import Stopped
from facecls.core.run_folder import RunFolder
from facecls.engine.builder import TrainingSetup, set_phase
from facecls.engine.steps import RunningStats, StepContext, evaluate, train_one_epoch
from facecls.runtime.distributed import barrier


@dataclass
class LoopState:
    """Where training stands; every checkpoint holds it."""

    epoch: int = 0
    """Epochs done."""
    step_in_epoch: int = 0
    """Optimizer steps done in the current epoch."""
    global_step: int = 0
    best_val_acc: float = -1.0
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
        self.epochs = setup.recipe.train.epochs
        self.resume_hint = resume_hint

    def fit(self) -> LoopState:
        self._start()
        try:
            for callback in self.callbacks:
                callback.on_fit_start(self)
            for phase in self.phases:
                if phase.done(self):
                    continue
                model = phase.enter(self)
                while not phase.done(self):
                    started = time.perf_counter()
                    train = self._train_epoch(phase, model)
                    self._end_epoch(phase, train, time.perf_counter() - started)
        finally:
            for callback in self.callbacks:
                callback.on_fit_end(self)
        return self.state

    def _start(self) -> None:
        s, t = self.setup, self.setup.recipe.train
        if s.env.enabled and self.state.step_in_epoch == 0 and self.state.epoch == 0:
            torch.manual_seed(t.seed + s.env.rank)  # ranks draw different dropout masks
        if s.runtime.compile:
            self.model = torch.compile(self.model)
        if self.state.epoch < self.epochs:
            self.console.log(
                f"training {s.recipe.name}: {t.epochs} epochs ({t.frozen_epochs} frozen), "
                f"{s.steps_per_epoch} steps/epoch, batch {t.batch_size} = {s.env.world_size} process(es) x "
                f"{s.micro_batch} x {t.grad_accum} accumulation; {s.runtime.device}, {s.runtime.precision}"
                f"{', channels_last' if s.runtime.channels_last else ''}"
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
        lr = s.optimizer.param_groups[0]["lr"]
        state.epoch += 1
        state.step_in_epoch = 0
        improved = monitor > state.best_val_acc
        if improved:
            state.best_val_acc = monitor
        end = EpochEnd(phase.name, train, val_metrics, monitor, lr, seconds, improved)
        for callback in self.callbacks:
            callback.on_epoch_end(self, end)

    def step_end(self, step: int, steps: int, running: RunningStats) -> None:
        """Called by a phase after each optimizer step."""
        self.state.step_in_epoch = step
        self.state.global_step += 1
        for callback in self.callbacks:
            callback.on_step_end(self, step, steps, running)

    def wrap(self) -> nn.Module:
        """The model the steps call: DDP around the current trainable set under torchrun. Wrapped anew
        for each phase, because DDP fixes the parameters it synchronises when it is constructed."""
        s = self.setup
        if not s.env.enabled:
            return self.model
        device_ids = [s.env.local_rank] if s.runtime.device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

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
            "rng": rng_state(),
            "config": recipe_to_dict(s.recipe),
            "class_names": s.class_names,
            "manifest_sha256": s.data.manifest_sha256,
            "model_name": s.recipe.model.name,
            "preprocess": s.preprocess.as_dict(),
            "world_size": s.env.world_size,
            "phases": {phase.name: phase.state_dict() for phase in self.phases},
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
            partial=RunningStats(*checkpoint["partial"]) if s.env.is_main else RunningStats(),
        )
        for phase in self.phases:
            phase.load_state_dict(checkpoint.get("phases", {}).get(phase.name, {}))
        set_rng_state(checkpoint["rng"])
        if s.env.enabled:  # ranks draw different dropout masks
            torch.manual_seed(int(torch.initial_seed()) + s.env.rank)


# ---- phases ----------------------------------------------------------------------------------------
class EpochPhase(Phase):
    """Epochs up to ``until`` over the training loader: the head alone (``frozen``) or the recipe's
    unfrozen part of the backbone with it. Entering the fine-tuning phase at its first step switches
    the learning rate to ``optim.finetune_lr`` when the recipe sets one."""

    def __init__(self, name: str, until: int, frozen: bool):
        self.name, self.until, self.frozen = name, until, frozen

    def done(self, loop: Loop) -> bool:
        return loop.state.epoch >= self.until

    def enter(self, loop: Loop) -> nn.Module:
        recipe, state = loop.setup.recipe, loop.state
        set_phase(loop.model, self.frozen, recipe.train)
        model = loop.wrap()
        starts_now = state.epoch == recipe.train.frozen_epochs and state.step_in_epoch == 0
        if not self.frozen and starts_now and recipe.optim.finetune_lr is not None:
            for group in loop.setup.optimizer.param_groups:
                group["lr"] = recipe.optim.finetune_lr
        return model

    def train_epoch(self, loop: Loop, model: nn.Module) -> RunningStats:
        s, state, t = loop.setup, loop.state, loop.setup.recipe.train
        start, steps = state.step_in_epoch, s.steps_per_epoch
        s.train_loader.sampler.set_epoch(state.epoch, start * t.batch_size)
        stats, state.partial = state.partial, RunningStats()
        bar = loop.console.progress(f"epoch {state.epoch + 1}/{t.epochs}", steps, start)

        def after_step(step: int, running: RunningStats) -> None:
            bar.update(
                step, f"loss {running.loss:.3f} acc {100 * running.accuracy:.1f}% {running.images_per_s:.0f} img/s"
            )
            loop.step_end(step, steps, running)

        ctx = StepContext(s.optimizer, s.criterion, s.runtime, s.normalize, s.scaler, t.grad_accum, steps, after_step)
        try:
            train_one_epoch(model, s.train_loader, ctx, stats, start_step=start)
        finally:
            bar.close()
        return stats.reduced(s.env)


def recipe_phases(setup: TrainingSetup) -> list[Phase]:
    """The recipe's schedule: ``frozen_epochs`` with the backbone frozen, then fine-tuning."""
    t = setup.recipe.train
    return [EpochPhase("frozen", t.frozen_epochs, frozen=True), EpochPhase("finetune", t.epochs, frozen=False)]


# ---- callbacks -------------------------------------------------------------------------------------
class SchedulerStep(Callback):
    """The learning-rate schedule steps once per epoch (a plateau schedule on the monitored accuracy)."""

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        scheduler = loop.setup.scheduler
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(end.monitor)
        elif scheduler is not None:
            scheduler.step()


class MetricsLog(Callback):
    """Per epoch: a row of metrics.csv, the curves redrawn (main process), and a log line."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

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
        }
        if loop.setup.env.is_main:
            self.folder.append_metrics(row)
        loop.console.log(
            f"epoch {loop.state.epoch}/{loop.epochs}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"
            + (f"  val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%" if val else "")
            + f"  lr {end.lr:.2e}  {row['train_img_per_s']:.1f} img/s"
            + ("  (best)" if end.improved else "")
        )


class Checkpoints(Callback):
    """last.ckpt after every epoch and every ``every`` steps (0: never mid-epoch), best.ckpt when the
    monitored accuracy improved; on a stop request, last.ckpt right at the step where training stops."""

    def __init__(self, folder: RunFolder, every: int = 0):
        self.folder, self.every = folder, every

    def save(self, loop: Loop, name: str, running: RunningStats | None = None) -> None:
        if loop.setup.env.is_main:
            self.folder.save_checkpoint(name, loop.state_dict(running))

    def on_step_end(self, loop: Loop, step: int, steps: int, running: RunningStats) -> None:
        if step >= steps:  # the epoch's last step: its end saves
            return
        if loop.state.stop_requested or (self.every and step % self.every == 0):
            self.save(loop, "last.ckpt", running.reduced(loop.setup.env))

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        if end.improved:
            self.save(loop, "best.ckpt")
        self.save(loop, "last.ckpt")
        barrier(loop.setup.env)


class StopOnSignal(Callback):
    """The first Ctrl-C (or SIGTERM) asks for a stop: the current optimizer step completes, last.ckpt is
    saved right there (Checkpoints, which must come before this callback), so the resumed run is exactly
    the uninterrupted one, and training stops. A second Ctrl-C stops at once, keeping the last checkpoint.
    Single-process runs only: under torchrun the processes could not agree on the step."""

    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.previous: dict = {}
        self.signal = signal.SIGINT

    def on_fit_start(self, loop: Loop) -> None:
        loop.state.stop_requested = False
        if loop.setup.env.enabled or threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame) -> None:
            if loop.state.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not loop.state.stop_requested:
                again = "; Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
                name = signal.Signals(signum).name
                os.write(2, f"\n{name}: stopping after this step (saving a checkpoint){again}\n".encode())
            loop.state.stop_requested, self.signal = True, signum

        self.previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_fit_end(self, loop: Loop) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def on_step_end(self, loop: Loop, step: int, steps: int, running: RunningStats) -> None:
        if loop.state.stop_requested and step < steps:  # at the epoch's last step: stop after its end
            raise self.stopped(loop)

    def on_epoch_end(self, loop: Loop, end: EpochEnd) -> None:
        if loop.state.stop_requested and loop.state.epoch < loop.epochs:
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


def run_callbacks(folder: RunFolder, setup: TrainingSetup) -> list[Callback]:
    """What ``facecls train`` hangs on the loop, in the order it must run."""
    every = setup.recipe.train.checkpoint_every
    return [SchedulerStep(), MetricsLog(folder), Checkpoints(folder, every), StopOnSignal(folder)]

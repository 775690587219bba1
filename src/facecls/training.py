"""``facecls train``: set up a run folder, data, model and optimiser, then fit (resumably)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facecls import runs
from facecls.checkpoint import (
    load_checkpoint,
    load_model_state,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from facecls.config import Recipe, TrainConfig, recipe_to_dict
from facecls.console import Console
from facecls.data.pipeline import build_datasets, eval_loader, make_manifest, train_loader
from facecls.data.scan import find_labelled_images, read_skipped, write_skipped
from facecls.data.split import class_names_from, manifest_sha256, write_manifest
from facecls.data.transforms import Normalize
from facecls.distributed import DistEnv, barrier, convert_sync_batchnorm, init_distributed
from facecls.engine import RunningStats, StepContext, evaluate, train_one_epoch
from facecls.errors import FaceclsError
from facecls.features import StoredFeatures, ToDevice, feature_eval_loader, feature_train_loader, load_or_compute
from facecls.models.registry import FaceClassifier, create_model, get_entry, get_weight_spec
from facecls.models.weights import load_backbone_weights, read_state_dict, resolve_weights_file
from facecls.runs import Preprocess
from facecls.speed import Runtime, prepare_training_model, resolve_runtime


def resolve_preprocess(recipe: Recipe) -> Preprocess:
    """Recipe values win; otherwise the weights' metadata; otherwise the model's default and ImageNet."""
    spec = get_weight_spec(recipe.model.name, recipe.model.weights)
    entry = get_entry(recipe.model.name)
    from facecls.config import IMAGENET_MEAN, IMAGENET_STD

    size = recipe.data.input_size or (spec.input_size if spec else entry.default_input_size)
    mean = recipe.data.mean or (spec.mean if spec else IMAGENET_MEAN)
    std = recipe.data.std or (spec.std if spec else IMAGENET_STD)
    resize = recipe.data.resize or round(size * 256 / 224)
    if resize < size:
        raise FaceclsError(f"data.resize ({resize}) must be >= data.input_size ({size})")
    return Preprocess(size, resize, tuple(mean), tuple(std))


def load_pretrained(model: FaceClassifier, recipe: Recipe, offline: bool, console: Console) -> dict:
    """Load the recipe's weights into the backbone; returns what the run folder records."""
    spec = get_weight_spec(recipe.model.name, recipe.model.weights)
    if spec is None and not recipe.model.weights_path:
        console.warn(
            f"NO PRETRAINED WEIGHTS: {recipe.model.name} starts from random initialisation (model.weights=none)"
        )
        return {"name": "none"}
    from facecls.download import sha256_file

    file = resolve_weights_file(spec, recipe.model.weights_path, recipe.model.weights_sha256, offline)
    state = read_state_dict(file, spec)
    report = load_backbone_weights(model.backbone, state, str(file), sha256_file(file))
    console.log(f"weights {recipe.model.weights}: {report.summary()}")
    return {"name": recipe.model.weights, **report.as_dict()}


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's top-level children that hold parameters, in forward order ("blocks")."""
    children = [c for c in backbone.children() if any(True for _ in c.parameters())]
    if len(children) == 1 and isinstance(children[0], nn.Sequential):  # e.g. MobileNetV2.features
        children = [c for c in children[0].children() if any(True for _ in c.parameters())]
    return children


def set_phase(model: FaceClassifier, frozen: bool, train: TrainConfig) -> None:
    """Frozen phase: only the head trains. Afterwards: all, the last N parameter tensors of the whole
    model (the seed's "last N layers", head included), or the head plus the last N backbone blocks."""
    model.backbone_frozen = frozen
    if frozen:
        model.backbone.requires_grad_(False)
    elif train.unfreeze == "all":
        model.backbone.requires_grad_(True)
    elif train.unfreeze == "last_params":
        model.backbone.requires_grad_(False)
        for param in list(model.parameters())[-train.unfreeze_last_n :]:
            param.requires_grad_(True)
    else:
        model.backbone.requires_grad_(False)
        for block in backbone_blocks(model.backbone)[-train.unfreeze_last_n :]:
            block.requires_grad_(True)
    model.head.requires_grad_(True)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    params = list(model.parameters())  # all of them: frozen ones simply get no gradient
    if o.name == "adam":
        kind, kwargs = torch.optim.Adam, {"lr": o.lr, "betas": o.betas, "weight_decay": o.weight_decay}
    elif o.name == "adamw":
        kind, kwargs = torch.optim.AdamW, {"lr": o.lr, "betas": o.betas, "weight_decay": o.weight_decay}
    else:
        kind, kwargs = torch.optim.SGD, {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}
    if recipe.speed.fused_optimizer and kind is not torch.optim.SGD:
        # One kernel per step instead of a dozen per parameter group: Adam's step measured 3-4x faster on
        # CPU (ResNet-50 with 7,000 classes: 95 -> 21 ms), which is 5-15% of a training step at 64-112 px.
        # (Fused SGD without momentum fails on CPU in torch 2.14: `torch._fused_sgd_` gets None buffers.)
        try:
            return kind(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            pass
    return kind(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe):
    s = recipe.scheduler
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=s.factor, patience=s.patience, min_lr=s.min_lr
        )
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.train.epochs, eta_min=s.min_lr)
    return None


def uses_stored_features(train: TrainConfig) -> bool:
    """The head trains on stored features whenever the backbone is frozen (see train.feature_views)."""
    return train.feature_views > 0 and (train.frozen_epochs > 0 or train.unfreeze == "none")


@dataclass
class HeadPhase:
    """Progress of the stored-feature phase (kept in checkpoints, so a resumed run continues it)."""

    epochs: int = 0
    best: float = -1.0
    best_loss: float = math.inf
    since_best: int = 0
    done: bool = False

    def record(self, monitor: float, loss: float, train: TrainConfig) -> None:
        """One more epoch; better means a higher top-1, or the same top-1 at a lower loss (a small
        validation set reaches 100% long before the head has converged)."""
        self.epochs += 1
        if monitor > self.best or (monitor == self.best and loss < self.best_loss):
            self.best, self.best_loss, self.since_best = monitor, loss, 0
        else:
            self.since_best += 1
        self.done = self.since_best >= train.head_patience or self.epochs >= train.head_max_epochs


def next_phase(train: TrainConfig, epoch: int, head: HeadPhase) -> str | None:
    """The phase of epoch ``epoch`` (0-based): "features" (head on stored features), "frozen" (head on
    images, backbone frozen), "finetune"; None once training is over."""
    if uses_stored_features(train):
        if not head.done:
            return "features"
        finetune_epochs = 0 if train.unfreeze == "none" else train.epochs - train.frozen_epochs
        return "finetune" if epoch - head.epochs < finetune_epochs else None
    if epoch >= train.epochs:
        return None
    return "frozen" if epoch < train.frozen_epochs or train.unfreeze == "none" else "finetune"


@dataclass
class TrainResult:
    run: Path
    epochs: int
    best_val_acc: float
    final: dict


class Trainer:
    """Holds one run's state; ``fit()`` runs the epochs. Built by ``train()``."""

    def __init__(self, run: Path, recipe: Recipe, data_dir: Path, env: DistEnv, runtime: Runtime, console: Console):
        self.run, self.recipe, self.data_dir = run, recipe, data_dir
        self.env, self.runtime, self.console = env, runtime, console
        self.world = env.world_size
        t = recipe.train
        per_step = self.world * t.grad_accum
        if t.batch_size % per_step:
            raise FaceclsError(
                f"train.batch_size={t.batch_size} must be divisible by processes x grad_accum = {per_step}"
            )
        self.micro_batch = t.batch_size // per_step

    # ---- setup -------------------------------------------------------------------------------
    def setup(self, manifest: Path | None, offline: bool, resume_state: dict | None) -> None:
        recipe, env, console = self.recipe, self.env, self.console
        rows, scan_skipped = make_manifest(self.data_dir, recipe.data, manifest)
        self.manifest_sha = manifest_sha256(rows)
        self.class_names = class_names_from(rows)
        if resume_state is not None:
            if resume_state["manifest_sha256"] != self.manifest_sha:
                raise FaceclsError(f"{self.run}/split.csv changed since the checkpoint was written; cannot resume")
            if list(resume_state["class_names"]) != self.class_names:
                raise FaceclsError("the checkpoint's class list differs from the run's split; cannot resume")
        if env.is_main:
            write_manifest(self.run / "split.csv", rows)
        self.preprocess = resolve_preprocess(recipe)
        from facecls.download import cache_dir

        data = build_datasets(
            self.data_dir,
            rows,
            self.preprocess,
            recipe.data.augment,
            use_cache=recipe.speed.decoded_cache,
            cache_root=cache_dir() / "decoded",
            workers=max(1, self.runtime.threads),
            env=env,
        )
        self.datasets = data.datasets
        skipped = scan_skipped + data.skipped
        if manifest is not None and manifest.resolve() == (self.run / "split.csv").resolve():
            # A resumed run reads its own split: keep what the first scan left out (hidden files, ...).
            earlier = read_skipped(self.run / "skipped_files.csv")
            known = {s.path for s in earlier}
            skipped = earlier + [s for s in skipped if s.path not in known]
        if env.is_main:
            write_skipped(self.run / "skipped_files.csv", skipped)
        unreadable = sum(1 for s in skipped if s.reason.startswith("unreadable"))
        self.skipped_count = len(skipped)
        counts = {k: len(v) for k, v in self.datasets.items()}
        console.log(
            f"data: {len(self.class_names)} identities, "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + (f"; {len(skipped)} files left out ({unreadable} unreadable), see skipped_files.csv" if skipped else "")
        )
        if "train" not in self.datasets:
            raise FaceclsError("no readable training images")

        torch.manual_seed(recipe.train.seed)
        model = create_model(recipe.model.name, len(self.class_names), recipe.model.head)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            if self.micro_batch < 2 or len(self.datasets["train"]) < 2 * self.world:
                raise FaceclsError(
                    f"{recipe.model.name} has BatchNorm, which needs at least 2 images per batch and process: "
                    f"raise train.batch_size (now {recipe.train.batch_size} = {self.micro_batch} per process and "
                    f"step) or add training images (now {len(self.datasets['train'])})"
                )
        # Rank 0 alone reads (or downloads) the weights: DDP's construction copies them to every process.
        pretrained = resume_state is None and env.is_main
        self.weights_info = load_pretrained(model, recipe, offline, console) if pretrained else {}
        if recipe.train.sync_bn and env.enabled:
            model = convert_sync_batchnorm(model, self.runtime.device)
        self.model = prepare_training_model(model, self.runtime)
        self.normalize = Normalize(self.preprocess.mean, self.preprocess.std, self.runtime.channels_last).to(
            self.runtime.device
        )
        self.optimizer = build_optimizer(self.model, recipe)
        self.scheduler = build_scheduler(self.optimizer, recipe)
        self.scaler = self.runtime.grad_scaler()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_val_acc = -1.0
        self.head_phase, self.best_phase, self.phase = HeadPhase(), "", None
        self.partial = RunningStats()
        if resume_state is not None:
            self._restore(resume_state)

        self.train_loader = train_loader(self.datasets["train"], self.micro_batch, recipe.train.seed, env, self.runtime)
        self.val_loader = (
            eval_loader(self.datasets["val"], self.micro_batch * 2, env, self.runtime)
            if "val" in self.datasets
            else None
        )
        self.steps_per_epoch = self._steps(self.train_loader)
        self.eval_model, self.image_phase = self.model, (self.train_loader, self.val_loader, self.normalize)
        if env.is_main:
            self._write_run_json()

    def _steps(self, loader) -> int:
        steps = math.ceil(loader.sampler.samples_per_epoch() / self.recipe.train.batch_size)
        return min(steps, self.recipe.train.max_steps_per_epoch or steps)

    def _use_phase(self, phase: str) -> None:
        """Loaders, input step and evaluated module of ``phase``: stored features for "features"."""
        if phase != "features":
            self.train_loader, self.val_loader, self.normalize = self.image_phase
            self.eval_model = self.model
        else:
            self.train_loader, self.val_loader = self._feature_loaders()
            self.normalize = ToDevice(self.runtime.device)
            self.eval_model = getattr(self.model, "_orig_mod", self.model).head
        self.steps_per_epoch = self._steps(self.train_loader)

    def _feature_loaders(self):
        """Stored features of the training images (``train.feature_views`` views) and of the validation
        images (the image itself), computed once by rank 0 and reused from the cache afterwards."""
        from facecls.download import cache_dir
        from facecls.embeddings import embedder_of

        t, env = self.recipe.train, self.env
        embedder = embedder_of(self.model, self.preprocess, self.runtime, self.recipe.model.name)
        stored = {}
        for split, views in (("train", t.feature_views), ("val", 1)):
            if split not in self.datasets:
                continue
            dataset = self.datasets[split]
            kwargs = dict(views=views, seed=t.seed, cache_root=cache_dir(), batch_size=self.micro_batch * 2)
            if env.is_main:
                started = time.perf_counter()
                features, reused = load_or_compute(embedder, dataset, console=self.console, **kwargs)
                self.console.log(
                    f"{split} features: {len(dataset)} images x {views} view(s) "
                    + ("reused from the cache" if reused else f"computed in {time.perf_counter() - started:.1f} s")
                )
            barrier(env)
            if not env.is_main:
                features, _ = load_or_compute(embedder, dataset, **kwargs)
            stored[split] = StoredFeatures(features, dataset.labels)
        train = feature_train_loader(stored["train"], self.micro_batch, t.seed, env.rank, self.world)
        if "val" not in stored:
            return train, None
        return train, feature_eval_loader(stored["val"], self.micro_batch * 2, env.rank, self.world)

    def _write_run_json(self) -> None:
        t = self.recipe.train
        info = runs.read_run_info(self.run) if (self.run / "run.json").exists() else {}
        info.update(
            {
                "data_dir": str(self.data_dir.resolve()),
                "model": self.recipe.model.name,
                "recipe": self.recipe.name,
                "num_classes": len(self.class_names),
                "preprocess": self.preprocess.as_dict(),
                "speed": self.runtime.as_dict(),
                "batch": {
                    "global": t.batch_size,
                    "per_process": self.micro_batch,
                    "grad_accum": t.grad_accum,
                    "processes": self.world,
                },
                "seed": t.seed,
                "split_seed": self.recipe.data.split_seed,
                "manifest_sha256": self.manifest_sha,
                "skipped_files": self.skipped_count,
                "environment": runs.environment(),
            }
        )
        if self.weights_info:
            info["weights"] = self.weights_info
        runs.write_json(self.run / "run.json", info)
        runs.write_json(self.run / "classes.json", {"class_names": self.class_names})
        runs.write_config(self.run, self.recipe)

    # ---- checkpoints -------------------------------------------------------------------------
    def _state(self, stats: RunningStats | None) -> dict:
        return {
            "model": getattr(self.model, "_orig_mod", self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "partial": [stats.loss_sum, stats.correct, stats.count] if stats else [0.0, 0.0, 0.0],
            "best_val_acc": self.best_val_acc,
            "head_phase": dataclasses.asdict(self.head_phase),
            "phase": self.phase,
            "best_phase": self.best_phase,
            "rng": rng_state(),
            "config": recipe_to_dict(self.recipe),
            "class_names": self.class_names,
            "manifest_sha256": self.manifest_sha,
            "model_name": self.recipe.model.name,
            "preprocess": self.preprocess.as_dict(),
            "world_size": self.world,
        }

    def save(self, name: str, stats: RunningStats | None = None) -> None:
        if self.env.is_main:
            save_checkpoint(self._state(stats), self.run / name)

    def _restore(self, state: dict) -> None:
        load_model_state(self.model, state["model"], self.run / "last.ckpt")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.best_val_acc = int(state["global_step"]), float(state["best_val_acc"])
        self.head_phase = HeadPhase(**state.get("head_phase", {}))
        self.best_phase = str(state.get("best_phase", ""))
        if self.env.is_main:
            self.partial = RunningStats(*state["partial"])
        set_rng_state(state["rng"])
        if self.env.enabled:  # ranks draw different dropout masks
            torch.manual_seed(int(torch.initial_seed()) + self.env.rank)

    # ---- the loop ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_at_step_boundary(self):
        """The first Ctrl-C (or SIGTERM) asks for a stop: the current optimizer step completes, last.ckpt
        is saved right there (so the resumed run is exactly the uninterrupted one) and training stops.
        A second Ctrl-C stops at once, keeping the last checkpoint. Single-process runs only: under
        torchrun the processes could not agree on the step."""
        self.stop_requested = False
        if self.env.enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame) -> None:
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            os.write(2, b"\nstopping after this step (saving a checkpoint); Ctrl-C again to stop at once\n")

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stopped(self) -> FaceclsError:
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch}" if self.step_in_epoch else f"epoch {self.epoch}"
        return FaceclsError(
            f"stopped at the end of {where}; progress saved in {self.run / 'last.ckpt'}: "
            f"continue with `facecls train --resume {self.run}`"
        )

    def _wrap(self, module: nn.Module) -> nn.Module:
        """DDP wrapper for the current trainable set. Re-wrapped when the phase changes, because DDP
        fixes the parameters it synchronises when it is constructed."""
        if not self.env.enabled:
            return module
        device_ids = [self.env.local_rank] if self.runtime.device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def planned_epochs(self) -> int:
        """Epochs of the whole run as far as known: a stored-feature phase counts at most its cap until it ends."""
        t = self.recipe.train
        if not uses_stored_features(t):
            return t.epochs
        head = self.head_phase.epochs if self.head_phase.done else t.head_max_epochs
        return head + (0 if t.unfreeze == "none" else t.epochs - t.frozen_epochs)

    def fit(self) -> TrainResult:
        t, console = self.recipe.train, self.console
        if self.env.enabled and self.step_in_epoch == 0 and self.epoch == 0:
            torch.manual_seed(t.seed + self.env.rank)
        if self.runtime.compile:
            self.model = torch.compile(self.model)
        if next_phase(t, self.epoch, self.head_phase) is not None:
            head = (
                f"head on stored features ({t.feature_views} view(s)) until validation stops improving, "
                if uses_stored_features(t)
                else f"{t.frozen_epochs} frozen, "
            )
            console.log(
                f"training {self.recipe.name}: {head}up to {self.planned_epochs()} epochs, "
                f"{self.steps_per_epoch} image steps/epoch, batch {t.batch_size} = {self.world} process(es) x "
                f"{self.micro_batch} x {t.grad_accum} accumulation; {self.runtime.device}, {self.runtime.precision}"
                f"{', channels_last' if self.runtime.channels_last else ''}"
            )
        wrapped, self.phase = None, None
        with self._stop_at_step_boundary():
            while (phase := next_phase(t, self.epoch, self.head_phase)) is not None:
                if phase != self.phase:
                    set_phase(self.model, phase != "finetune", t)
                    self._use_phase(phase)
                    self.phase = phase
                    wrapped = self._wrap(self.eval_model)
                    finetune_start = self.head_phase.epochs if uses_stored_features(t) else t.frozen_epochs
                    if phase == "finetune" and self.epoch == finetune_start and self.step_in_epoch == 0:
                        if self.recipe.optim.finetune_lr is not None:
                            for group in self.optimizer.param_groups:
                                group["lr"] = self.recipe.optim.finetune_lr
                self._run_epoch(wrapped)
        final = self._finish()
        return TrainResult(self.run, self.epoch, self.best_val_acc, final)

    def _run_epoch(self, model: nn.Module) -> None:
        t, env = self.recipe.train, self.env
        start = self.step_in_epoch
        self.train_loader.sampler.set_epoch(self.epoch, start * t.batch_size)
        stats, self.partial = self.partial, RunningStats()
        started = time.perf_counter()
        total = self.steps_per_epoch
        bar = self.console.progress(f"epoch {self.epoch + 1}/{self.planned_epochs()} ({self.phase})", total, start)

        def after_step(step: int, running: RunningStats) -> None:
            self.step_in_epoch = step
            self.global_step += 1
            bar.update(
                step, f"loss {running.loss:.3f} acc {100 * running.accuracy:.1f}% {running.images_per_s:.0f} img/s"
            )
            stop = self.stop_requested and step < total  # at the epoch's last step: stop after its end
            if stop or (t.checkpoint_every and step % t.checkpoint_every == 0 and step < total):
                self.save("last.ckpt", running.reduced(env))
            if stop:
                raise self._stopped()

        ctx = StepContext(
            self.optimizer,
            self.criterion,
            self.runtime,
            self.normalize,
            self.scaler,
            grad_accum=t.grad_accum,
            max_steps=total,
            pass_labels=getattr(self.model, "_orig_mod", self.model).head.takes_labels,
            after_step=after_step,
        )
        try:
            train_one_epoch(model, self.train_loader, ctx, stats, start_step=start)
        except KeyboardInterrupt:
            # Under torchrun nothing is saved here: the processes may be at different points, and a
            # collective (or a checkpoint off by one step) would be wrong. The last checkpoint stands.
            raise FaceclsError(
                f"interrupted; resume from the last checkpoint with `facecls train --resume {self.run}`"
            ) from None
        finally:
            bar.close()
        train_stats = stats.reduced(env)
        seconds = time.perf_counter() - started
        val = evaluate(self.eval_model, self.val_loader, self.runtime, self.normalize, env) if self.val_loader else None
        val_metrics = val.metrics(len(self.class_names)) if val is not None else None
        monitor = val_metrics["top1"] if val_metrics else train_stats.accuracy
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitor)
        elif self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        if self.phase == "features":
            self.head_phase.record(monitor, val_metrics["loss"] if val_metrics else train_stats.loss, t)
        images = train_stats.count
        row = {
            "epoch": self.epoch,
            "phase": self.phase,
            "train_loss": round(train_stats.loss, 6),
            "train_acc": round(train_stats.accuracy, 6),
            "val_loss": round(val_metrics["loss"], 6) if val_metrics else "",
            "val_acc": round(val_metrics["top1"], 6) if val_metrics else "",
            "val_top5": round(val_metrics["top5"], 6) if val_metrics else "",
            "lr": lr,
            "seconds": round(seconds, 2),
            "train_img_per_s": round(images / max(seconds, 1e-9), 2),
        }
        improved = monitor > self.best_val_acc
        if improved:
            self.best_val_acc, self.best_phase = monitor, self.phase
        if env.is_main:
            runs.append_metrics(self.run / "metrics.csv", row)
            runs.plot_curves(self.run / "metrics.csv", self.run / "curves.png")
        self.console.log(
            f"epoch {self.epoch}/{self.planned_epochs()} ({self.phase})  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"
            + (f"  val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%" if val_metrics else "")
            + f"  lr {lr:.2e}  {row['train_img_per_s']:.1f} img/s"
            + ("  (best)" if improved else "")
        )
        if improved:
            self.save("best.ckpt")
        self.save("last.ckpt")
        barrier(env)
        if self.stop_requested and next_phase(t, self.epoch, self.head_phase) is not None:
            raise self._stopped()

    def _finish(self) -> dict:
        from facecls.evaluation import evaluate_run

        results = {}
        for split in ("val", "test"):
            if split in self.datasets:
                results[split] = evaluate_run(self.run, split, env=self.env, console=self.console, quiet=True)
        if self.env.is_main:
            info = runs.read_run_info(self.run)
            runs.write_json(self.run / "run.json", {**info, "completed": True})
            text = ", ".join(f"{k} top-1 {100 * v['top1']:.2f}%" for k, v in results.items())
            best = load_checkpoint(self.run / "best.ckpt") if (self.run / "best.ckpt").is_file() else {}
            where = f" (epoch {best['epoch']}, {best.get('phase') or 'training'} phase)" if best else ""
            self.console.log(f"done: best checkpoint {self.run / 'best.ckpt'}{where}; {text}")
        return results


RUN_FILES = ("config.yaml", "run.json", "split.csv")
"""What a run folder holds once setup is done: enough to resume it (from scratch without a checkpoint)."""


def prepare_run_folder(run: Path, resume: bool) -> dict | None:
    """Create a fresh run folder, or find the checkpoint to resume from (None: no checkpoint was written
    yet, the run starts again from the beginning with its recorded recipe and split)."""
    if resume:
        if not run.is_dir():
            raise FaceclsError(f"nothing to resume: run folder {run} does not exist")
        missing = [name for name in RUN_FILES if not (run / name).is_file()]
        if missing:
            raise FaceclsError(
                f"nothing to resume in {run}: not a facecls run folder (no {missing[0]}); "
                "start a new run with --recipe and --data instead of --resume"
            )
        remove_stale_temp_files(run)
        last = run / "last.ckpt"
        return load_checkpoint(last) if last.is_file() else None
    if any((run / name).exists() for name in ("last.ckpt", "metrics.csv", "config.yaml")):
        raise FaceclsError(f"{run} already holds a run: resume it with --resume {run}, or choose another --out")
    if run.exists() and not run.is_dir():
        raise FaceclsError(f"--out {run} is a file, not a folder")
    run.mkdir(parents=True, exist_ok=True)
    return None


def train(
    recipe: Recipe,
    data_dir: Path | None,
    run: Path,
    *,
    resume: bool = False,
    manifest: Path | None = None,
    offline: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``recipe`` on ``data_dir`` into ``run`` (or continue the run in ``run`` with resume)."""
    env = init_distributed(device)
    console = Console(enabled=env.is_main, progress=progress)
    run = Path(run)
    if not resume:
        if data_dir is None:
            raise FaceclsError("--data DIR is required for a new run")
        find_labelled_images(Path(data_dir))  # a wrong --data fails before the run folder is created
    state = None
    if env.is_main:
        state = prepare_run_folder(run, resume)
    barrier(env)
    if resume:
        if not env.is_main:
            state = load_checkpoint(run / "last.ckpt") if (run / "last.ckpt").is_file() else None
        recipe = runs.read_run_recipe(run)
        info = runs.read_run_info(run)
        if info.get("completed"):
            raise FaceclsError(
                f"run {run} already finished training; nothing to resume "
                f"(evaluate it with `facecls evaluate {run}`, or train a new run with another --out)"
            )
        data_dir = Path(info["data_dir"])
        manifest = run / "split.csv"
        epochs_done = int(state["epoch"]) if state is not None else 0
        if state is None:
            console.log(f"no checkpoint in {run} yet: starting it again from the beginning (same recipe and split)")
        elif next_phase(recipe.train, epochs_done, HeadPhase(**state.get("head_phase", {}))) is None:
            console.log(f"{run} finished training before its final evaluation; evaluating now")
        else:
            console.log(f"resuming {run} at epoch {epochs_done + 1}, step {state['step_in_epoch']}")
        if env.is_main:  # rows of epochs after the checkpoint are trained again; drop them
            runs.truncate_metrics(run / "metrics.csv", epochs_done)
            runs.plot_curves(run / "metrics.csv", run / "curves.png")
    runtime = resolve_runtime(recipe.speed, device, env.local_rank)
    if runtime.device == "cpu":
        torch.set_num_threads(runtime.threads)
    random.seed(recipe.train.seed)
    np.random.seed(recipe.train.seed % 2**32)
    trainer = Trainer(run, recipe, Path(data_dir), env, runtime, console)
    trainer.setup(manifest, offline, state)
    return trainer.fit()

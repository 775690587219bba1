"""``facecls train``: set up a run folder, data, model and optimiser, then fit (resumably)."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facecls import runs
from facecls.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from facecls.config import Recipe, TrainConfig, recipe_to_dict
from facecls.console import Console
from facecls.data.pipeline import build_datasets, eval_loader, make_manifest, train_loader
from facecls.data.scan import write_skipped
from facecls.data.split import class_names_from, manifest_sha256, write_manifest
from facecls.data.transforms import Normalize
from facecls.distributed import DistEnv, barrier, init_distributed
from facecls.engine import RunningStats, StepContext, evaluate, train_one_epoch
from facecls.errors import FaceclsError
from facecls.models.registry import FaceClassifier, create_model, get_entry, get_weight_spec
from facecls.models.weights import load_backbone_weights, read_state_dict, resolve_weights_file
from facecls.runs import Preprocess
from facecls.speed import Runtime, resolve_runtime


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
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe):
    s = recipe.scheduler
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=s.factor, patience=s.patience, min_lr=s.min_lr
        )
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.train.epochs, eta_min=s.min_lr)
    return None


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
        if env.is_main:
            write_skipped(self.run / "skipped_files.csv", skipped)
        unreadable = sum(1 for s in skipped if s.reason.startswith("unreadable"))
        self.skipped_count = len(skipped)
        counts = {k: len(v) for k, v in self.datasets.items()}
        console.log(
            f"data: {len(self.class_names)} identities, " + ", ".join(f"{k} {v}" for k, v in counts.items())
            + (f"; {len(skipped)} files left out ({unreadable} unreadable), see skipped_files.csv" if skipped else "")
        )
        if "train" not in self.datasets:
            raise FaceclsError("no readable training images")

        torch.manual_seed(recipe.train.seed)
        model = create_model(recipe.model.name, len(self.class_names), recipe.model.head)
        self.weights_info = load_pretrained(model, recipe, offline, console) if resume_state is None else {}
        if recipe.train.sync_bn and env.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory_format = torch.channels_last if self.runtime.channels_last else torch.contiguous_format
        self.model = model.to(self.runtime.device, memory_format=memory_format)
        self.normalize = Normalize(self.preprocess.mean, self.preprocess.std, self.runtime.channels_last).to(
            self.runtime.device
        )
        self.optimizer = build_optimizer(self.model, recipe)
        self.scheduler = build_scheduler(self.optimizer, recipe)
        self.scaler = self.runtime.grad_scaler()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_val_acc = -1.0
        self.partial = RunningStats()
        if resume_state is not None:
            self._restore(resume_state)

        self.train_loader = train_loader(self.datasets["train"], self.micro_batch, recipe.train.seed, env, self.runtime)
        self.val_loader = (
            eval_loader(self.datasets["val"], self.micro_batch * 2, env, self.runtime) if "val" in self.datasets else None
        )
        steps = math.ceil(len(self.datasets["train"]) / recipe.train.batch_size)
        self.steps_per_epoch = min(steps, recipe.train.max_steps_per_epoch or steps)
        if env.is_main:
            self._write_run_json()

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
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "partial": [stats.loss_sum, stats.correct, stats.count] if stats else [0.0, 0.0, 0.0],
            "best_val_acc": self.best_val_acc,
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
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.best_val_acc = int(state["global_step"]), float(state["best_val_acc"])
        if self.env.is_main:
            self.partial = RunningStats(*state["partial"])
        set_rng_state(state["rng"])
        if self.env.enabled:  # ranks draw different dropout masks
            torch.manual_seed(int(torch.initial_seed()) + self.env.rank)

    # ---- the loop ----------------------------------------------------------------------------
    def _wrap(self) -> nn.Module:
        """DDP wrapper for the current trainable set. Re-wrapped when the phase changes, because DDP
        fixes the parameters it synchronises when it is constructed."""
        if not self.env.enabled:
            return self.model
        device_ids = [self.env.local_rank] if self.runtime.device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def fit(self) -> TrainResult:
        t, console = self.recipe.train, self.console
        if self.epoch >= t.epochs:
            raise FaceclsError(f"run {self.run} already finished {t.epochs} epochs; nothing to resume")
        if self.env.enabled and self.step_in_epoch == 0 and self.epoch == 0:
            torch.manual_seed(t.seed + self.env.rank)
        if self.runtime.compile:
            self.model = torch.compile(self.model)
        console.log(
            f"training {self.recipe.name}: {t.epochs} epochs ({t.frozen_epochs} frozen), "
            f"{self.steps_per_epoch} steps/epoch, batch {t.batch_size} = {self.world} process(es) x "
            f"{self.micro_batch} x {t.grad_accum} accumulation; {self.runtime.device}, {self.runtime.precision}"
            f"{', channels_last' if self.runtime.channels_last else ''}"
        )
        wrapped, phase = None, None
        while self.epoch < t.epochs:
            frozen = self.epoch < t.frozen_epochs
            if phase != frozen:
                set_phase(self.model, frozen, t)
                wrapped, phase = self._wrap(), frozen
                if not frozen and self.epoch == t.frozen_epochs and self.step_in_epoch == 0:
                    if self.recipe.optim.finetune_lr is not None:
                        for group in self.optimizer.param_groups:
                            group["lr"] = self.recipe.optim.finetune_lr
            self._run_epoch(wrapped)
        final = self._finish()
        return TrainResult(self.run, t.epochs, self.best_val_acc, final)

    def _run_epoch(self, model: nn.Module) -> None:
        t, env = self.recipe.train, self.env
        start = self.step_in_epoch
        self.train_loader.sampler.set_epoch(self.epoch, start * t.batch_size)
        stats, self.partial = self.partial, RunningStats()
        started = time.perf_counter()
        total = self.steps_per_epoch
        bar = self.console.progress(f"epoch {self.epoch + 1}/{t.epochs}", total, start)

        def after_step(step: int, running: RunningStats) -> None:
            self.step_in_epoch = step
            self.global_step += 1
            bar.update(step, f"loss {running.loss:.3f} acc {100 * running.accuracy:.1f}% {running.images_per_s:.0f} img/s")
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total:
                self.save("last.ckpt", running.reduced(env))

        ctx = StepContext(
            self.optimizer,
            self.criterion,
            self.runtime,
            self.normalize,
            self.scaler,
            grad_accum=t.grad_accum,
            max_steps=total,
            after_step=after_step,
        )
        try:
            train_one_epoch(model, self.train_loader, ctx, stats, start_step=start)
        except KeyboardInterrupt:
            bar.close()
            self.save("last.ckpt", stats.reduced(env))
            raise FaceclsError(f"interrupted; progress saved: resume with `facecls train --resume {self.run}`") from None
        bar.close()
        train_stats = stats.reduced(env)
        seconds = time.perf_counter() - started
        val = evaluate(self.model, self.val_loader, self.runtime, self.normalize, env) if self.val_loader else None
        val_metrics = val.metrics(len(self.class_names)) if val is not None else None
        monitor = val_metrics["top1"] if val_metrics else train_stats.accuracy
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(monitor)
        elif self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        images = train_stats.count
        row = {
            "epoch": self.epoch,
            "phase": "frozen" if self.epoch <= t.frozen_epochs else "finetune",
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
            self.best_val_acc = monitor
        if env.is_main:
            runs.append_metrics(self.run / "metrics.csv", row)
            runs.plot_curves(self.run / "metrics.csv", self.run / "curves.png")
        self.console.log(
            f"epoch {self.epoch}/{t.epochs}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%"
            + (f"  val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%" if val_metrics else "")
            + f"  lr {lr:.2e}  {row['train_img_per_s']:.1f} img/s" + ("  (best)" if improved else "")
        )
        if improved:
            self.save("best.ckpt")
        self.save("last.ckpt")
        barrier(env)

    def _finish(self) -> dict:
        from facecls.evaluation import evaluate_run

        results = {}
        for split in ("val", "test"):
            if split in self.datasets:
                results[split] = evaluate_run(self.run, split, env=self.env, console=self.console, quiet=True)
        if self.env.is_main:
            text = ", ".join(f"{k} top-1 {100 * v['top1']:.2f}%" for k, v in results.items())
            self.console.log(f"done: best checkpoint {self.run / 'best.ckpt'}; {text}")
        return results


def prepare_run_folder(run: Path, resume: bool) -> dict | None:
    """Create a fresh run folder, or find the checkpoint to resume from."""
    if resume:
        last = run / "last.ckpt"
        if not last.is_file():
            raise FaceclsError(f"nothing to resume in {run}: no last.ckpt (start a new run without --resume)")
        return load_checkpoint(last)
    if (run / "last.ckpt").exists() or (run / "metrics.csv").exists():
        raise FaceclsError(f"{run} already holds a run: resume it with --resume {run}, or choose another --out")
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
    env = init_distributed()
    console = Console(enabled=env.is_main, progress=progress)
    state = None
    if env.is_main:
        state = prepare_run_folder(run, resume)
    barrier(env)
    if resume:
        if not env.is_main:
            state = load_checkpoint(run / "last.ckpt")
        recipe = runs.read_run_recipe(run)
        info = runs.read_run_info(run)
        data_dir = Path(info["data_dir"])
        manifest = run / "split.csv"
        if state["epoch"] >= recipe.train.epochs:
            raise FaceclsError(f"run {run} already finished {recipe.train.epochs} epochs; nothing to resume")
        console.log(f"resuming {run} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}")
    if data_dir is None:
        raise FaceclsError("--data DIR is required for a new run")
    runtime = resolve_runtime(recipe.speed, device, env.local_rank)
    if runtime.device == "cpu":
        torch.set_num_threads(runtime.threads)
    random.seed(recipe.train.seed)
    np.random.seed(recipe.train.seed % 2**32)
    trainer = Trainer(run, recipe, Path(data_dir), env, runtime, console)
    trainer.setup(manifest, offline, state)
    return trainer.fit()

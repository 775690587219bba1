"""The builder of a training run: recipe + data folder + runtime -> everything the loop needs, as one value.

Nothing here writes files or changes process-wide state; ``facecls train``, the benchmarks and the tests
build a run the same way, so what they measure and check is what the command trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from facecls.config import IMAGENET_MEAN, IMAGENET_STD, Preprocess, Recipe, TrainConfig
from facecls.core.console import Console
from facecls.core.errors import FaceclsError
from facecls.data.datasets import FaceImages
from facecls.data.pipeline import build_datasets, eval_loader, make_manifest, train_loader
from facecls.data.scan import SkippedFile
from facecls.data.split import ManifestRow, class_names_from, manifest_sha256
from facecls.data.transforms import Normalize
from facecls.models.registry import FaceClassifier, create_model, default_flip_tta, get_entry, get_weight_spec
from facecls.models.weights import load_backbone_weights, read_state_dict, resolve_weights_file
from facecls.runtime.cpu_kernels import use_compiled_prelu
from facecls.runtime.distributed import DistEnv, convert_sync_batchnorm
from facecls.runtime.fused_bn import FusedConvBNPReLU, use_fused_batchnorm_prelu
from facecls.runtime.speed import Runtime, prepare_training_model

SINGLE_PROCESS = DistEnv()


def resolve_preprocess(recipe: Recipe) -> Preprocess:
    """Recipe values win; otherwise the weights' metadata; otherwise the model's default and ImageNet."""
    spec = get_weight_spec(recipe.model.name, recipe.model.weights)
    entry = get_entry(recipe.model.name)
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
    from facecls.core.download import sha256_file

    file = resolve_weights_file(spec, recipe.model.weights_path, recipe.model.weights_sha256, offline)
    state = read_state_dict(file, spec)
    report = load_backbone_weights(model.backbone, state, str(file), sha256_file(file))
    console.log(f"weights {recipe.model.weights}: {report.summary()}")
    return {"name": recipe.model.weights, **report.as_dict()}


def unaligned_warning(recipe: Recipe, data_dir: Path, paths: list[Path], sample: int = 50) -> str | None:
    """A warning when the recipe's weights expect aligned face crops and the training images do not look
    like them: no ``facecls prepare`` report beside them, and sampled images not of the aligned size."""
    from PIL import Image

    size = get_entry(recipe.model.name).aligned_size
    if size is None or recipe.model.weights == "none":
        return None
    if any((folder / "prepare_report.csv").is_file() for folder in (data_dir, data_dir / "train")):
        return None
    step = max(1, len(paths) // sample)
    picked = paths[::step][:sample]
    other = 0
    for path in picked:
        try:
            with Image.open(path) as image:
                other += image.size != (size, size)
        except OSError:
            continue
    if not other:
        return None
    return (
        f"{other} of {len(picked)} sampled training images are not {size}x{size} and {data_dir} has no "
        f"prepare report: {recipe.model.name} expects faces aligned to its template; run "
        f"`facecls prepare RAW_DIR ALIGNED_DIR --size {size}` first"
    )


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


def uses_stored_features(train: TrainConfig) -> bool:
    """The head trains on stored features whenever the backbone is frozen (see train.feature_views)."""
    return train.feature_views > 0 and (train.frozen_epochs > 0 or train.unfreeze == "none")


def finetune_epochs(train: TrainConfig) -> int:
    """Epochs in which the backbone trains, after the head alone (0 with train.unfreeze: none)."""
    return 0 if train.unfreeze == "none" else train.epochs - train.frozen_epochs


def backbone_never_trains(train: TrainConfig) -> bool:
    """The head trains on stored features and the backbone stays frozen throughout: the run's backbone is
    the pretrained one, so evaluating it can read (and fill) the same feature stores."""
    return uses_stored_features(train) and train.unfreeze == "none"


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


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    """Images per process and forward pass: the global batch over processes x accumulation steps."""
    per_step = world_size * train.grad_accum
    if train.batch_size % per_step:
        raise FaceclsError(
            f"train.batch_size={train.batch_size} must be divisible by processes x grad_accum = {per_step}"
        )
    return train.batch_size // per_step


@dataclass
class RunData:
    """A run's split and its decoded datasets."""

    rows: list[ManifestRow]
    manifest_sha256: str
    class_names: list[str]
    preprocess: Preprocess
    datasets: dict[str, FaceImages]
    skipped: list[SkippedFile]
    """Files left out: by the folder scan and as unreadable images."""

    def summary(self, skipped: list[SkippedFile] | None = None) -> str:
        """The log line on the data (``skipped``: the list the run folder records, when it differs)."""
        skipped = self.skipped if skipped is None else skipped
        unreadable = sum(1 for s in skipped if s.reason.startswith("unreadable"))
        counts = {k: len(v) for k, v in self.datasets.items()}
        return (
            f"data: {len(self.class_names)} identities, "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + (f"; {len(skipped)} files left out ({unreadable} unreadable), see skipped_files.csv" if skipped else "")
        )


def build_data(
    recipe: Recipe,
    data_dir: Path,
    runtime: Runtime,
    env: DistEnv = SINGLE_PROCESS,
    *,
    manifest: Path | None = None,
    cache_root: Path | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> RunData:
    """The split (read from ``manifest``, else a fresh seeded one) and its datasets, decoded once."""
    rows, scan_skipped = make_manifest(data_dir, recipe.data, manifest)
    preprocess = resolve_preprocess(recipe)
    if cache_root is None:
        from facecls.core.download import cache_dir

        cache_root = cache_dir() / "decoded"
    data = build_datasets(
        data_dir,
        rows,
        preprocess,
        recipe.data.augment,
        use_cache=recipe.speed.decoded_cache,
        cache_root=cache_root,
        workers=max(1, runtime.threads),
        env=env,
        splits=splits,
    )
    return RunData(
        rows, manifest_sha256(rows), class_names_from(rows), preprocess, data.datasets, scan_skipped + data.skipped
    )


@dataclass
class TrainingSetup:
    """Everything one training run needs, built by :func:`build_training`."""

    recipe: Recipe
    data_dir: Path
    runtime: Runtime
    env: DistEnv
    data: RunData
    micro_batch: int
    """Images per process and forward pass."""
    steps_per_epoch: int
    train_loader: DataLoader
    val_loader: DataLoader | None
    model: FaceClassifier
    normalize: Normalize
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    weights: dict
    """What was loaded as pretrained weights ({} when none were loaded here)."""

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def preprocess(self) -> Preprocess:
        return self.data.preprocess


def build_training(
    recipe: Recipe,
    data_dir: Path,
    runtime: Runtime,
    env: DistEnv = SINGLE_PROCESS,
    *,
    data: RunData | None = None,
    manifest: Path | None = None,
    load_weights: bool = True,
    offline: bool = False,
    console: Console | None = None,
    cache_root: Path | None = None,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> TrainingSetup:
    """Datasets, loaders, the model with its weights (on the runtime's device), optimizer, scheduler,
    scaler, loss and normalisation for ``recipe`` on ``data_dir``. ``data`` reuses an earlier
    :func:`build_data`; ``load_weights=False`` leaves the pretrained weights out (a resumed run restores
    its own; under torchrun rank 0 alone reads them, DDP copies them to the others). The model is
    initialised from torch's global RNG: seed it first for a reproducible run."""
    console = console or Console(enabled=False)
    micro_batch = micro_batch_size(recipe.train, env.world_size)
    data_dir = Path(data_dir)
    if data is None:
        data = build_data(recipe, data_dir, runtime, env, manifest=manifest, cache_root=cache_root, splits=splits)
    if not data.datasets.get("train"):
        unreadable = sum(1 for s in data.skipped if s.reason.startswith("unreadable"))
        raise FaceclsError(
            f"no readable training images under {data_dir}/train ({unreadable} unreadable); "
            "see skipped_files.csv in the run folder"
        )
    train_set = data.datasets["train"]
    warning = unaligned_warning(recipe, data_dir, train_set.paths)
    if warning:
        console.warn(warning)
    model = create_model(recipe.model.name, len(data.class_names), recipe.model.head)
    model.flip_tta = default_flip_tta(recipe.model)  # validation as evaluate and predict will see it
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if micro_batch < 2 or len(train_set) < 2 * env.world_size:
            raise FaceclsError(
                f"{recipe.model.name} has BatchNorm, which needs at least 2 images per batch and process: "
                f"raise train.batch_size (now {recipe.train.batch_size} = {micro_batch} per process and "
                f"step) or add training images (now {len(train_set)})"
            )
    weights = load_pretrained(model, recipe, offline, console) if load_weights else {}
    if recipe.train.sync_bn and env.enabled:
        model = convert_sync_batchnorm(model, runtime.device)
    model = prepare_training_model(model, runtime)
    trains_backbone = finetune_epochs(recipe.train) > 0  # else the CPU training kernels never run
    fused_prelus: list[nn.Module] = []
    if runtime.fused_bn_prelu and trains_backbone:
        switched, why_not = use_fused_batchnorm_prelu(model, runtime.amp_dtype or torch.float32)
        if why_not:
            console.warn(f"BatchNorm + PReLU pairs train unfused (slower): {why_not}")
        elif switched:
            console.log(f"{switched} BatchNorm + PReLU pairs fused for training (off: speed.fused_bn_prelu=false)")
        fused_prelus = [m.act for m in model.modules() if isinstance(m, FusedConvBNPReLU)]
    if runtime.compiled_prelu and trains_backbone:
        switched, why_not = use_compiled_prelu(model, skip=fused_prelus)  # the fused pairs apply their own
        if why_not:
            console.warn(f"PReLU layers train uncompiled (slower): {why_not}")
        elif switched:
            console.log(f"{switched} PReLU layers compiled for training (speed.compiled_prelu=false: ATen's kernels)")
    normalize = Normalize(data.preprocess.mean, data.preprocess.std, runtime.channels_last).to(runtime.device)
    optimizer = build_optimizer(model, recipe)
    loaders = {"workers": runtime.workers, "pin_memory": runtime.pin_memory}
    train_batches = train_loader(train_set, micro_batch, recipe.train.seed, env, **loaders)
    val_batches = eval_loader(data.datasets["val"], micro_batch * 2, env, **loaders) if "val" in data.datasets else None
    steps = math.ceil(train_batches.sampler.samples_per_epoch() / recipe.train.batch_size)
    return TrainingSetup(
        recipe=recipe,
        data_dir=data_dir,
        runtime=runtime,
        env=env,
        data=data,
        micro_batch=micro_batch,
        steps_per_epoch=min(steps, recipe.train.max_steps_per_epoch or steps),
        train_loader=train_batches,
        val_loader=val_batches,
        model=model,
        normalize=normalize,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, recipe),
        scaler=runtime.grad_scaler(),
        criterion=nn.CrossEntropyLoss(label_smoothing=recipe.train.label_smoothing),
        weights=weights,
    )

"""Typed recipe configuration: nested dataclasses, strict YAML loading, ``key=value`` overrides.

A recipe file is the whole description of a training run; every field below can be set in
the YAML file or overridden on the command line with ``--set section.field=value``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from facecls.core.errors import FaceclsError
from facecls.recipes import RECIPES_DIR, bundled_recipes

_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Training augmentation (the seed notebook's, applied to the training split only)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    """RandomResizedCrop area range, taken from the image resized to ``data.resize``."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rotation: float = 15.0
    """Maximum in-plane rotation in degrees (0 turns it off)."""
    color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.1)
    """Brightness, contrast, saturation, hue jitter (all 0 turns it off)."""
    grayscale: float = 0.1
    """Probability of converting to greyscale."""

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        for name in ("hflip", "grayscale"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")


@dataclass
class DataConfig:
    """How images become tensors and how the labelled images are split."""

    input_size: int | None = None
    """Square input side in pixels; null takes it from the weights' metadata (224 without weights)."""
    resize: int | None = None
    """Side the training image is resized to before the random crop; null = input_size * 256 / 224."""
    mean: tuple[float, float, float] | None = None
    """Normalisation mean on [0, 1] RGB; null takes it from the weights (ImageNet without weights)."""
    std: tuple[float, float, float] | None = None
    """Normalisation std on [0, 1] RGB; null takes it from the weights (ImageNet without weights)."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train / val / test fractions of the labelled images (stratified per identity)."""
    split_seed: int = 42
    """Seed of the split; same seed + same files gives a byte-identical manifest."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""

    def __post_init__(self) -> None:
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ValueError(f"data.split fractions must be >= 0 and sum to 1, got {list(self.split)}")
        if self.input_size is not None and self.input_size < 16:
            raise ValueError(f"data.input_size must be >= 16, got {self.input_size}")


@dataclass
class HeadConfig:
    """Classification head on the backbone's feature vector."""

    hidden: int | None = None
    """Hidden width: Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear (the seed notebook: 512);
    null gives Dropout -> Linear."""
    dropout: float = 0.5
    """Dropout probability before the last Linear (before the normalisation for the cosine heads)."""
    kind: Literal["linear", "cosine", "arcface", "cosface", "logistic", "nearest_mean", "knn"] = "linear"
    """linear: a Linear layer; cosine: scaled cosines to L2-normalised class weights; arcface / cosface: the
    same with insightface's additive angular / cosine margin on the target class in training only;
    logistic: multinomial logistic regression on the L2-normalised features, fitted to convergence (L-BFGS)
    on the stored features, its L2 penalty chosen on validation (see ``c``; it can be fine-tuned with the
    backbone afterwards); nearest_mean / knn: cosine to the class means / k nearest training features (no
    gradient steps at all: they need train.unfreeze: none)."""
    k: int = 10
    """knn: the number of neighbours (weighted by 1 / cosine distance)."""
    c: float | None = 10.0
    """logistic: the inverse L2 penalty C (scikit-learn's meaning: loss summed over the training features
    + ||W||^2 / 2C); null: the one of 1, 10, 100 with the lowest validation loss. 10 measured best on SFace
    features (benchmarks/RESULTS.md): a validation set of a few hundred faces chooses C too noisily."""
    scale: float | None = None
    """Cosine heads: the scale s of the cosines; null: 64 (insightface's)."""
    margin: float | None = None
    """arcface: the angular margin m in radians (null: 0.5); cosface: the cosine margin (null: 0.4)."""

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.head.dropout must be in [0, 1), got {self.dropout}")
        if self.kind in ("linear", "knn", "logistic") and (self.scale is not None or self.margin is not None):
            raise ValueError("model.head.scale and model.head.margin apply to the cosine, arcface and cosface heads")
        if self.kind == "nearest_mean" and self.margin is not None:
            raise ValueError("model.head.kind=nearest_mean has no margin")
        if self.c is not None and not self.c > 0:
            raise ValueError(f"model.head.c must be > 0 (or null), got {self.c}")
        if self.k < 1:
            raise ValueError(f"model.head.k must be >= 1, got {self.k}")
        if self.kind != "linear" and self.hidden:
            raise ValueError(f"model.head.hidden applies to the linear head only, not to {self.kind}")
        if self.kind == "cosine" and self.margin not in (None, 0, 0.0):
            raise ValueError("model.head.kind=cosine has no margin; use arcface or cosface for one")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"model.head.scale must be > 0, got {self.scale}")
        if self.margin is not None:
            limit = math.pi / 2 if self.kind == "arcface" else 1.0
            if not 0 <= self.margin < limit:
                raise ValueError(f"model.head.margin for {self.kind} must be in [0, {limit:.4g}), got {self.margin}")

    @property
    def resolved_scale(self) -> float:
        return 64.0 if self.scale is None else self.scale

    @property
    def resolved_margin(self) -> float:
        if self.margin is not None:
            return self.margin
        return {"arcface": 0.5, "cosface": 0.4}.get(self.kind, 0.0)


@dataclass
class ModelConfig:
    """Which network, which pretrained weights, which head."""

    name: str = "resnet50"
    """Registered model name (see `facecls models`)."""
    weights: str = "none"
    """Named pretrained weights (e.g. imagenet1k_v1, vggface2) or 'none' for random init."""
    weights_path: str | None = None
    """Local weights file (.pt/.pth/.safetensors/.onnx) used instead of the cache or a download."""
    weights_sha256: str | None = None
    """Expected SHA-256 of the weights file; a mismatch is refused."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Classification head."""
    flip_tta: bool | None = None
    """Evaluation and prediction: feed the backbone each image and its mirror and give the head the mean
    of the two features (test-time augmentation); null: on for the face-embedding models that gain from it
    (see `facecls models`), off otherwise. `--no-tta` turns it off for one evaluate/predict."""


@dataclass
class OptimConfig:
    """Optimizer settings."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    """Optimizer."""
    lr: float = 1e-3
    """Learning rate while the backbone is frozen (and after, unless finetune_lr is set)."""
    finetune_lr: float | None = None
    """Learning rate from the epoch the backbone is unfrozen (InceptionResNetV1 recipe: 5e-4)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW)."""
    momentum: float = 0.9
    """SGD momentum."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["plateau", "cosine", "none"] = "plateau"
    """ReduceLROnPlateau on validation accuracy, cosine annealing, or a constant lr."""
    factor: float = 0.5
    """Plateau: multiply the lr by this when validation accuracy stalls."""
    patience: int = 2
    """Plateau: epochs without improvement before reducing."""
    min_lr: float = 0.0
    """Lower bound of the lr."""


@dataclass
class TrainConfig:
    """The training schedule."""

    epochs: int = 10
    """Total epochs, frozen ones included (with stored features: frozen_epochs + fine-tuning epochs)."""
    frozen_epochs: int = 0
    """Epochs at the start that train the head only."""
    unfreeze: Literal["all", "last_params", "last_blocks", "none"] = "all"
    """After the frozen epochs, train everything, the last N parameter tensors of the whole model
    (the seed's meaning of "the last N layers"; the head counts), the last N backbone blocks, or nothing
    more (none: the backbone stays frozen, only the head is trained)."""
    unfreeze_last_n: int = 0
    """N for unfreeze: last_params / last_blocks."""
    feature_views: int = 2
    """While the backbone is frozen, train the head on stored features: each training image's embedding
    computed once per view (1: the image; 2: and its mirror; more: random augmentations) and kept in the
    cache for later runs; the head phase then lasts until validation stops improving (head_patience, at
    most head_max_epochs) and frozen_epochs only says that there is one. 0: the frozen epochs run the
    backbone on augmented images, frozen_epochs of them."""
    head_patience: int = 5
    """Stored-feature phase: stop after this many epochs without a better validation top-1."""
    head_max_epochs: int = 100
    """Stored-feature phase: at most this many epochs."""
    batch_size: int = 64
    """Global batch size (over all processes and accumulation steps)."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    seed: int = 0
    """Seed of initialisation, data order, augmentation and dropout."""
    max_steps_per_epoch: int | None = None
    """Cut each epoch after this many optimizer steps (for quick tries)."""
    checkpoint_every: int = 0
    """Also save last.ckpt every N optimizer steps within an epoch (0: at epoch end only)."""
    sync_bn: bool = False
    """Use SyncBatchNorm when training on several processes."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.frozen_epochs <= self.epochs:
            raise ValueError(f"train.frozen_epochs must be in [0, epochs={self.epochs}], got {self.frozen_epochs}")
        if self.unfreeze in ("last_params", "last_blocks") and self.unfreeze_last_n < 1:
            raise ValueError(f"train.unfreeze={self.unfreeze} needs train.unfreeze_last_n >= 1")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("train.batch_size and train.grad_accum must be >= 1")
        if self.feature_views < 0 or self.head_patience < 1 or self.head_max_epochs < 1:
            raise ValueError("train.feature_views must be >= 0, train.head_patience and head_max_epochs >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class SpeedConfig:
    """Speed switches; each can be turned off. The run folder records which were on."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 where the CPU/GPU supports it, fp16 + grad scaler on older GPUs, else fp32."""
    channels_last: bool = True
    """Use the channels_last memory format for the model and its inputs."""
    compile: bool = False
    """torch.compile the model."""
    decoded_cache: bool = True
    """Decode and resize every image once into a memory-mapped uint8 cache."""
    workers: int | None = None
    """DataLoader worker processes; null picks from the machine."""
    threads: int | None = None
    """CPU compute threads (torch.set_num_threads); null picks from the machine and the workers."""
    fused_optimizer: bool = True
    """Adam/AdamW's fused kernel where the device has one (else the default implementation)."""
    depthwise_fp32_input_grad: bool = True
    """CPU bf16 training: strided depthwise convolutions compute their input gradient in fp32 (oneDNN's bf16
    kernel for it is 3-50x slower without AMX; MobileNetV2 trains 1.4x faster)."""
    compiled_prelu: bool = True
    """CPU training: PReLU layers (SFace's) run forward and backward as compiled kernels once the backbone
    trains (ATen's backward is 2.8x slower; a compilation of about 6 s, once per process)."""
    bf16_relu_bits: bool = True
    """CPU bf16: ReLU and ReLU6 layers clamp the activations' bit patterns as int16, 4.7-5.6x faster than
    ATen's in-place bf16 kernels and the same values (but NaN with the sign bit set, which becomes 0)."""
    relu6_from_output: bool = True
    """CPU training without speed.compile: in-place ReLU6 layers (MobileNetV2's) take their gradient from their
    output, as ReLU does, instead of ATen's copy of their input (a pass over each activation); the same
    gradients."""
    bf16_out_of_place_residuals: bool = True
    """CPU bf16: torchvision ResNet blocks add their shortcut out of place (ATen's in-place bf16 add is 2.3x
    slower than its out-of-place one); the same sums."""
    dropout_from_bits: bool | None = None
    """CPU training without speed.compile: dropout layers draw their masks as 64-bit random words cut into
    four 16-bit draws, instead of ATen's bernoulli_, a serial loop of one double per value on CPUs that are
    not Intel's (on Intel's it is MKL's vectorised generator). SFace's head mask: 17.9 -> 1.9 ms per batch of
    32 on the AVX512-BF16 EPYC. The drop probability within 1/131,072 of p, ATen's scaling, other random
    numbers. null: on for CPUs that are not Intel's."""
    fused_bn_prelu: bool = True
    """CPU training without speed.compile: each BatchNorm followed by a PReLU (SFace's 27) runs as two
    compiled passes forward and two backward instead of ATen's five to six (SFace's step 1.27-1.31x on the AMX
    Xeon, 1.59x on the AVX512-BF16 EPYC; compiled once per process, about 15 s the first time on a machine,
    then from inductor's cache)."""
    conv_gemm: bool = True
    """CPU training without speed.compile: each convolution shape times its output, input gradient and weight
    gradient as oneDNN kernels and as matrix products (GEMM) once per process and keeps the faster
    (on an AMX Xeon: ResNet-50 1.02-1.18x per step, most at 112 px; InceptionResNetV1 1.04-1.18x)."""
    fold_batchnorm: bool = True
    """Prediction only: fold each BatchNorm into the convolution before it (checked on a probe batch)."""
    compile_inference: bool | None = None
    """Prediction only: torch.compile the model with its weights frozen (6-27 s once, then 1.1-1.4x faster
    on CPU); null: on when predicting at least 5,000 images."""
    inference_backend: str = "auto"
    """Prediction and embedding: ``torch``, ``openvino`` (pip install "facecls[openvino]"), or ``auto``:
    OpenVINO on a CPU with AMX for at least 1,000 images when it is installed (1.4-2.9x faster there,
    benchmarks/RESULTS.md), else PyTorch."""
    pin_memory: bool | None = None
    """Pinned host memory for GPU transfers; null picks (on for CUDA)."""

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"speed.workers must be >= 0 (or null), got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"speed.threads must be >= 1 (or null), got {self.threads}")
        if self.inference_backend not in ("auto", "torch", "openvino"):
            raise ValueError(f"speed.inference_backend must be auto, torch or openvino, got {self.inference_backend!r}")


@dataclass
class Recipe:
    """A complete, reproducible training recipe."""

    name: str = "custom"
    """Short name of the recipe (used in tables)."""
    description: str = ""
    """What the recipe is and where its settings come from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def __post_init__(self) -> None:
        t = self.train
        if self.model.head.kind == "logistic" and not (
            t.feature_views >= 1 and (t.frozen_epochs > 0 or t.unfreeze == "none")
        ):
            raise ValueError(
                "model.head.kind=logistic is fitted on stored features of a frozen backbone: it needs "
                "train.feature_views >= 1 and train.frozen_epochs >= 1 (or train.unfreeze: none); to train "
                "the head by gradient steps from the start use model.head.kind=linear"
            )
        if self.model.head.kind in ("nearest_mean", "knn"):
            if self.train.unfreeze != "none" or self.train.feature_views < 1:
                raise ValueError(
                    f"model.head.kind={self.model.head.kind} takes no gradient steps: it needs a frozen backbone "
                    "and stored features (train.unfreeze: none, train.feature_views >= 1)"
                )


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs; fixed per run so evaluate and predict match training."""

    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"input_size": self.input_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(int(d["input_size"]), int(d["resize"]), tuple(d["mean"]), tuple(d["std"]))


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` to the annotated type or raise a ValueError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise ValueError(f"{where}: expected a list of {len(items)} values, got {value!r}")
        return tuple(_check_value(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True)))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, which reads "1e-3" (no dot) as a string; users mean the number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown key '{prefix}{unknown[0]}' (valid keys: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _check_value(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def recipe_from_dict(values: dict) -> Recipe:
    """Build a Recipe from a plain dict; unknown keys and bad values raise FaceclsError."""
    try:
        return _build(Recipe, values, "")
    except ValueError as exc:
        raise FaceclsError(f"bad recipe: {exc}") from None


def recipe_to_dict(recipe: Recipe) -> dict:
    """A plain, YAML/JSON-friendly dict (tuples become lists)."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [plain(v) for v in obj]
        return obj

    return plain(dataclasses.asdict(recipe))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a bundled recipe (``resnet50`` -> recipes/resnet50.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if bundled.is_file():
        return bundled
    raise FaceclsError(f"recipe '{name_or_path}' not found: give a YAML file or one of: {', '.join(bundled_recipes())}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.field=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in text:
        raise FaceclsError(f"bad override '{text}': use section.field=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a raw recipe dict (before validation)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise FaceclsError(f"bad override '{text}': '{key}' is not a section")
            node = child
        node[keys[-1]] = value
    return values


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file strictly and apply command-line overrides."""
    path = resolve_recipe_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise FaceclsError(f"recipe {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise FaceclsError(f"recipe {path} must be a YAML mapping of sections")
    values = apply_overrides(values, overrides or [])
    try:
        return _build(Recipe, values, "")
    except ValueError as exc:
        raise FaceclsError(f"bad recipe {path.name}: {exc}") from None

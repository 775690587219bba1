"""Model registry: a decorator adds a backbone builder by name; ``create_model`` builds backbone + head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from facecls.config import HeadConfig, ModelConfig
from facecls.core.errors import FaceclsError
from facecls.models.heads import build_head
from facecls.models.weights import WeightSpec


@dataclass(frozen=True)
class ModelEntry:
    """A registered model family: how to build its backbone and which weights it knows."""

    name: str
    build_backbone: Callable[[], tuple[nn.Module, int]]
    """Returns (backbone, feature_dim); the backbone maps images to a feature vector."""
    weights: dict[str, WeightSpec] = field(default_factory=dict)
    default_input_size: int = 224
    description: str = ""
    flip_tta: bool = False
    """Whether evaluation and prediction use flip test-time augmentation by default (model.flip_tta: null)."""
    aligned_size: int | None = None
    """The side of the aligned face crops (``facecls prepare``) the pretrained weights expect, if any."""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    *,
    weights: dict[str, WeightSpec] | None = None,
    default_input_size: int = 224,
    description: str = "",
    flip_tta: bool = False,
    aligned_size: int | None = None,
) -> Callable:
    """Decorator for a backbone builder ``() -> (module, feature_dim)``; duplicate names are refused."""

    def wrap(builder: Callable[[], tuple[nn.Module, int]]):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = ModelEntry(
            name, builder, dict(weights or {}), default_input_size, description, flip_tta, aligned_size
        )
        return builder

    return wrap


def _ensure_loaded() -> None:
    # The families register themselves on import; importing here keeps the registry import-light.
    from facecls.models import families  # noqa: F401


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise FaceclsError(f"unknown model '{name}'; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_weight_spec(model: str, weights: str) -> WeightSpec | None:
    """The named weights of ``model``; None for 'none'."""
    if weights in ("none", "", None):
        return None
    entry = get_entry(model)
    if weights not in entry.weights:
        known = ", ".join(["none", *sorted(entry.weights)])
        raise FaceclsError(f"model '{model}' has no weights named '{weights}'; choose one of: {known}")
    return entry.weights[weights]


class FaceClassifier(nn.Module):
    """``backbone`` (images -> features) followed by ``head`` (features -> identity logits).

    While ``backbone_frozen`` is set, the backbone runs without autograd (its parameters are frozen
    anyway): the same outputs as the seed's frozen phase, without the cost of tracking the graph.
    BatchNorm running statistics still update in train mode, as in the seed.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head: HeadConfig):
        super().__init__()
        self.backbone = backbone
        self.head = build_head(feature_dim, num_classes, head)
        self.feature_dim = feature_dim
        self.backbone_frozen = False
        self.flip_tta = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features; in eval mode with ``flip_tta``, the mean over the image and its mirror."""
        if self.flip_tta and not self.training:
            both = self.backbone(torch.cat([x, torch.flip(x, dims=[3])]))
            return (both[: x.shape[0]] + both[x.shape[0] :]) / 2
        return self.backbone(x)

    def forward(self, x, labels=None):
        """Identity logits; ``labels`` (training only) put a margin head's margin on the target class."""
        if self.backbone_frozen:
            with torch.no_grad():
                features = self.features(x)
        else:
            features = self.features(x)
        if self.head.takes_labels:
            return self.head(features, labels)
        return self.head(features)


def default_flip_tta(model: ModelConfig) -> bool:
    """model.flip_tta, or when null the registered model's default."""
    return model.flip_tta if model.flip_tta is not None else get_entry(model.name).flip_tta


def create_model(name: str, num_classes: int, head: HeadConfig | None = None) -> FaceClassifier:
    """Build ``name``'s backbone (random init) with a new head for ``num_classes`` identities."""
    if num_classes < 1:
        raise FaceclsError(f"num_classes must be >= 1, got {num_classes}")
    backbone, feature_dim = get_entry(name).build_backbone()
    return FaceClassifier(backbone, feature_dim, num_classes, head or HeadConfig())

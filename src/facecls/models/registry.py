"""Model registry: a decorator adds a backbone builder by name; ``create_model`` builds backbone + head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from facecls.config import HeadConfig
from facecls.core.errors import FaceclsError
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


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, weights: dict[str, WeightSpec] | None = None, default_input_size: int = 224, description: str = ""
) -> Callable:
    """Decorator for a backbone builder ``() -> (module, feature_dim)``; duplicate names are refused."""

    def wrap(builder: Callable[[], tuple[nn.Module, int]]):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, dict(weights or {}), default_input_size, description)
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


class ClassifierHead(nn.Sequential):
    """Dropout -> Linear, or with ``hidden``: Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear."""

    def __init__(self, in_features: int, num_classes: int, config: HeadConfig):
        if config.hidden:
            layers = [
                nn.Linear(in_features, config.hidden),
                nn.BatchNorm1d(config.hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, num_classes),
            ]
        else:
            layers = [nn.Dropout(config.dropout), nn.Linear(in_features, num_classes)]
        super().__init__(*layers)


class FaceClassifier(nn.Module):
    """``backbone`` (images -> features) followed by ``head`` (features -> identity logits).

    While ``backbone_frozen`` is set, the backbone runs without autograd (its parameters are frozen
    anyway): the same outputs as the seed's frozen phase, without the cost of tracking the graph.
    BatchNorm running statistics still update in train mode, as in the seed.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, head: HeadConfig):
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(feature_dim, num_classes, head)
        self.feature_dim = feature_dim
        self.backbone_frozen = False

    def forward(self, x):
        if self.backbone_frozen:
            with torch.no_grad():
                features = self.backbone(x)
            return self.head(features)
        return self.head(self.backbone(x))


def create_model(name: str, num_classes: int, head: HeadConfig | None = None) -> FaceClassifier:
    """Build ``name``'s backbone (random init) with a new head for ``num_classes`` identities."""
    if num_classes < 1:
        raise FaceclsError(f"num_classes must be >= 1, got {num_classes}")
    backbone, feature_dim = get_entry(name).build_backbone()
    return FaceClassifier(backbone, feature_dim, num_classes, head or HeadConfig())

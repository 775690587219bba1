"""Classification heads on a backbone's feature vector, chosen by ``model.head.kind``.

``linear`` is a plain classifier (optionally with a hidden layer). ``cosine``, ``arcface`` and ``cosface``
compare the L2-normalised feature with L2-normalised class weights and scale the cosines by ``s``;
ArcFace adds an angular margin ``m`` to the target class's angle (cos(theta + m)), CosFace subtracts ``m``
from its cosine (cos(theta) - m), both as insightface's ``arcface_torch`` defines them
(``CombinedMarginLoss``: ArcFace falls back to cos(theta) - m * sin(m) once theta + m would pass pi, so
the logit keeps decreasing with the angle). Margins apply only in training, when the labels are given;
evaluation and prediction use the scaled cosine logits.

``nearest_mean`` and ``knn`` take no gradient steps: they are fitted once on the stored features of the
training images (class-mean unit vectors; the gallery of unit vectors) and keep them as buffers.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from facecls.config import HeadConfig


class ClassifierHead(nn.Sequential):
    """Dropout -> Linear, or with ``hidden``: Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear."""

    takes_labels = False
    fits_without_gradients = False

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


class MarginHead(nn.Module):
    """Normalised-weight head: ``s * cos(theta)``, with the ArcFace or CosFace margin on the target class
    in training (``forward(features, labels)``)."""

    takes_labels = True
    fits_without_gradients = False

    def __init__(self, in_features: int, num_classes: int, config: HeadConfig):
        super().__init__()
        self.kind = config.kind
        self.scale = float(config.resolved_scale)
        self.margin = float(config.resolved_margin)
        self.dropout = nn.Dropout(config.dropout)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=0.01)  # insightface's init of the class centres

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine of each feature with each class centre, in float32."""
        features = nn.functional.normalize(self.dropout(features).float(), dim=1)
        return features @ nn.functional.normalize(self.weight.float(), dim=1).T

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosines(features)
        if labels is None or not self.training or self.margin == 0:
            return cos * self.scale
        return margin_logits(cos, labels, self.kind, self.scale, self.margin)


def margin_logits(cos: torch.Tensor, labels: torch.Tensor, kind: str, scale: float, margin: float) -> torch.Tensor:
    """Training logits from cosines: the target class's cosine gets the ``kind`` margin, all are scaled."""
    rows = torch.arange(cos.shape[0], device=cos.device)
    target = cos[rows, labels].clamp(-1.0, 1.0)
    if kind == "cosface":
        adjusted = target - margin
    elif kind == "arcface":
        sin = torch.sqrt((1.0 - target * target).clamp_min(0.0))
        with_margin = target * math.cos(margin) - sin * math.sin(margin)  # cos(theta + m)
        # insightface: beyond theta + m = pi, cos(theta) - m * sin(m) keeps the logit monotonic in theta
        threshold, fallback = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
        adjusted = torch.where(target > threshold, with_margin, target - fallback)
    else:
        return cos * scale
    out = cos.clone()
    out[rows, labels] = adjusted
    return out * scale


class NearestMeanHead(nn.Module):
    """Nearest class mean by cosine: ``s * cos(feature, mean of the class's unit features)``. No gradient
    steps: `fit` sets the means from stored features; they are buffers, so the checkpoint holds them."""

    takes_labels = False
    fits_without_gradients = True

    def __init__(self, in_features: int, num_classes: int, config: HeadConfig):
        super().__init__()
        self.scale = float(config.resolved_scale)
        self.register_buffer("means", torch.zeros(num_classes, in_features))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """``features``: N x D (any scale), ``labels``: N class indices."""
        self.means.copy_(class_mean_directions(features, labels, len(self.means)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # cosines in float32
            unit = nn.functional.normalize(features.float(), dim=1)
            return self.scale * unit @ self.means.float().T


def class_mean_directions(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``num_classes x D`` float32: the unit vector of each class's mean unit feature (zero for a class
    without any)."""
    unit = nn.functional.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1], device=unit.device).index_add_(0, labels.to(unit.device), unit)
    return nn.functional.normalize(sums, dim=1)


class KNNHead(nn.Module):
    """k nearest neighbours by cosine among the training features (the gallery), each neighbour voting
    for its class with weight 1 / (cosine distance): the logits are the log of the vote shares. `fit` stores
    the gallery (float16 unit vectors and labels) as buffers, so the checkpoint holds it."""

    takes_labels = False
    fits_without_gradients = True
    _EPS = 1e-6

    def __init__(self, in_features: int, num_classes: int, config: HeadConfig):
        super().__init__()
        self.k, self.num_classes = config.k, num_classes
        self.register_buffer("gallery", torch.zeros(0, in_features, dtype=torch.float16))
        self.register_buffer("gallery_labels", torch.zeros(0, dtype=torch.int64))

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.gallery = nn.functional.normalize(features.float(), dim=1).to(torch.float16)
        self.gallery_labels = labels.to(torch.int64).clone()

    def resize_buffers(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Make room for a checkpoint's gallery (its size is known only once it is read)."""
        for name in ("gallery", "gallery_labels"):
            if prefix + name in state:
                setattr(self, name, torch.empty_like(state[prefix + name], device=getattr(self, name).device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # similarities and votes in float32
            return self._vote(nn.functional.normalize(features.float(), dim=1))

    def _vote(self, unit: torch.Tensor) -> torch.Tensor:
        if self.gallery.shape[0] == 0:
            return torch.zeros(unit.shape[0], self.num_classes, device=unit.device)
        similarity = unit @ self.gallery.float().T
        k = min(self.k, similarity.shape[1])
        top, index = similarity.topk(k, dim=1)
        weights = 1.0 / (1.0 - top).clamp_min(self._EPS)
        votes = torch.zeros(unit.shape[0], self.num_classes, device=unit.device)
        votes.scatter_add_(1, self.gallery_labels[index], weights)
        return torch.log(votes / votes.sum(1, keepdim=True) + self._EPS)


class LogisticHead(nn.Module):
    """Multinomial logistic regression on L2-normalised features, as scikit-learn's LogisticRegression
    fits it (cross-entropy summed over the training features + ||W||^2 / 2C, no penalty on the bias),
    fitted to convergence with L-BFGS rather than by epochs of gradient steps: the linear probe of the
    representation-learning literature (CLIP's protocol; ``config.c`` null picks C on validation as it
    does). Measured on SFace embeddings (benchmarks/RESULTS.md) it beats a head trained by AdamW with
    early stopping, which stops before the weights reach the large norm that unit-length features need."""

    takes_labels = False
    fits_without_gradients = True
    uses_validation = True
    GRID = (1.0, 10.0, 100.0)
    """C values tried (ascending: each fit starts from the previous one) when ``config.c`` is null."""
    DEFAULT_C = 10.0
    """C with ``config.c`` null but no validation split to choose on, or a problem too large for a grid."""
    MAX_ITER = 100
    GRID_LIMIT = 5e7
    """Training features x classes above which C is not chosen on a grid (each L-BFGS evaluation passes
    over all features x classes logits: at 224,000 features x 7,000 classes about 10 s on 2 cores)."""
    TIME_BUDGET_S = 600.0
    """A fit stops after this many seconds even if not converged (it starts from the class means, so it
    is a sound classifier from the first iteration on)."""
    CHUNK = 8192
    """Rows per block of the loss: its logits (CHUNK x classes floats) bound the memory of a fit."""

    def __init__(self, in_features: int, num_classes: int, config: HeadConfig):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.c = config.c
        self.register_buffer("chosen_c", torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # the fitted weights are large: float32
            return self.linear(nn.functional.normalize(features.float(), dim=1))

    @torch.enable_grad()
    def _fit_one(self, unit: torch.Tensor, labels: torch.Tensor, c: float, deadline: float) -> None:
        optimizer = torch.optim.LBFGS(
            self.linear.parameters(),
            lr=1.0,
            max_iter=10,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            total = 0.5 / c * (self.linear.weight**2).sum()
            total.backward()
            for start in range(0, len(unit), self.CHUNK):  # gradients add up over the blocks
                block = nn.functional.cross_entropy(
                    self.linear(unit[start : start + self.CHUNK]), labels[start : start + self.CHUNK], reduction="sum"
                )
                block.backward()
                total = total.detach() + block.detach()
            return total

        # Ten iterations at a time (L-BFGS keeps its history across calls), to honour the deadline.
        for _ in range(self.MAX_ITER // 10):
            before = optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0)
            optimizer.step(closure)
            done = optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0) - before < 10
            if done or time.monotonic() > deadline:
                break

    @torch.no_grad()
    def _start_from_class_means(self, unit: torch.Tensor, labels: torch.Tensor) -> None:
        means = class_mean_directions(unit, labels, len(self.linear.weight))
        self.linear.weight.copy_(16.0 * means)  # logits 16 x the cosine to the class mean
        self.linear.bias.zero_()

    def fit(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        val_features: torch.Tensor | None = None,
        val_labels: torch.Tensor | None = None,
    ) -> None:
        """Fit on ``features`` (N x D, any scale) and ``labels``; with ``config.c`` null, the C of GRID whose
        fit has the lowest cross-entropy on the validation features (by loss: on a small validation set
        top-1 ties too often to choose). Large problems (GRID_LIMIT) use DEFAULT_C; every fit together
        stops at TIME_BUDGET_S."""
        unit = nn.functional.normalize(features.float(), dim=1)
        labels = labels.to(unit.device)
        deadline = time.monotonic() + self.TIME_BUDGET_S
        self._start_from_class_means(unit, labels)
        no_grid = (
            val_features is None or len(val_features) == 0 or len(unit) * len(self.linear.weight) > self.GRID_LIMIT
        )
        if self.c is not None or no_grid:
            chosen = self.c if self.c is not None else self.DEFAULT_C
            self._fit_one(unit, labels, chosen, deadline)
        else:
            best = None
            for c in self.GRID:
                self._fit_one(unit, labels, c, deadline)
                with torch.no_grad():
                    loss = float(nn.functional.cross_entropy(self(val_features), val_labels.to(unit.device)))
                if best is None or loss < best[0]:
                    best = (loss, c, {k: v.clone() for k, v in self.linear.state_dict().items()})
            chosen = best[1]
            self.linear.load_state_dict(best[2])
        self.chosen_c.fill_(chosen)


def build_head(in_features: int, num_classes: int, config: HeadConfig) -> nn.Module:
    """The head ``config.kind`` names."""
    if config.kind == "linear":
        return ClassifierHead(in_features, num_classes, config)
    if config.kind == "logistic":
        return LogisticHead(in_features, num_classes, config)
    if config.kind == "nearest_mean":
        return NearestMeanHead(in_features, num_classes, config)
    if config.kind == "knn":
        return KNNHead(in_features, num_classes, config)
    return MarginHead(in_features, num_classes, config)

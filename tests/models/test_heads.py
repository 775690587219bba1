"""Heads chosen by model.head.kind: the margin formulas, margins in training only, config validation."""

import math

import pytest
import torch

from facecls.config import HeadConfig, recipe_from_dict
from facecls.core.errors import FaceclsError
from facecls.models.heads import ClassifierHead, LogisticHead, MarginHead, build_head, margin_logits
from facecls.models.registry import create_model

# float32 cosines of 16-d unit vectors: each a 16-term dot product, so a relative error of a few 1e-7
# per term; x scale 64 and the arccos/cos round trip below that stays well under 1e-4.
ATOL = 1e-4


def _head(kind: str, **kwargs) -> MarginHead:
    torch.manual_seed(0)
    head = build_head(16, 5, HeadConfig(kind=kind, dropout=0.0, **kwargs))
    assert isinstance(head, MarginHead)
    return head.requires_grad_(False)


def _batch():
    torch.manual_seed(1)
    return torch.randn(8, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])


def test_arcface_logits_follow_the_formula():
    head = _head("arcface", scale=30.0, margin=0.5)
    features, labels = _batch()
    cos = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    head.train()
    logits = head(features, labels)
    expected = 30.0 * cos.clone()
    for i, y in enumerate(labels.tolist()):
        theta = math.acos(float(cos[i, y]))
        if theta + 0.5 < math.pi:
            expected[i, y] = 30.0 * math.cos(theta + 0.5)
        else:  # insightface's fallback past pi
            expected[i, y] = 30.0 * (float(cos[i, y]) - math.sin(math.pi - 0.5) * 0.5)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    head.eval()  # evaluation and prediction: scaled cosines, no margin
    torch.testing.assert_close(head(features, labels), 30.0 * cos, atol=ATOL, rtol=0)
    torch.testing.assert_close(head(features), 30.0 * cos, atol=ATOL, rtol=0)


def test_arcface_fallback_beyond_pi():
    cos = torch.tensor([[-0.99, 0.2]])  # theta ~ 3.0 rad: theta + 0.5 passes pi
    out = margin_logits(cos, torch.tensor([0]), "arcface", 1.0, 0.5)
    assert float(out[0, 0]) == pytest.approx(-0.99 - math.sin(math.pi - 0.5) * 0.5, abs=1e-6)
    assert float(out[0, 1]) == pytest.approx(0.2, abs=1e-7)


def test_cosface_and_cosine_logits_follow_the_formula():
    features, labels = _batch()
    head = _head("cosface", scale=64.0, margin=0.35)
    cos = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    onehot = torch.nn.functional.one_hot(labels, 5).float()
    head.train()
    torch.testing.assert_close(head(features, labels), 64.0 * (cos - 0.35 * onehot), atol=ATOL, rtol=0)
    head.eval()
    torch.testing.assert_close(head(features, labels), 64.0 * cos, atol=ATOL, rtol=0)
    cosine = _head("cosine", scale=16.0)
    cosine.train()
    cos = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(cosine.weight, dim=1).T
    torch.testing.assert_close(cosine(features, labels), 16.0 * cos, atol=ATOL, rtol=0)


def test_defaults_and_linear_head():
    assert HeadConfig(kind="arcface").resolved_margin == 0.5 and HeadConfig(kind="arcface").resolved_scale == 64.0
    assert HeadConfig(kind="cosface").resolved_margin == 0.4
    assert isinstance(build_head(16, 5, HeadConfig()), ClassifierHead)


@pytest.mark.parametrize(
    "head, message",
    [
        ({"kind": "linear", "margin": 0.3}, "apply to the cosine"),
        ({"kind": "arcface", "hidden": 64}, "linear head only"),
        ({"kind": "cosine", "margin": 0.2}, "has no margin"),
        ({"kind": "arcface", "margin": 2.0}, "must be in"),
        ({"kind": "cosface", "scale": 0}, "scale must be > 0"),
        ({"kind": "sphereface"}, "not one of"),
        ({"kind": "logistic", "c": 0}, "must be > 0"),
    ],
)
def test_bad_head_configs_are_refused(head, message):
    with pytest.raises(FaceclsError, match=message):
        recipe_from_dict({"model": {"head": head}})


@pytest.mark.parametrize("kind", ["linear", "cosine", "arcface", "cosface"])
def test_every_head_trains_in_a_classifier(kind):
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 3, HeadConfig(kind=kind, dropout=0.0))
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    model.train()
    logits = model(x, labels)
    assert logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_logistic_head_without_stored_features_is_refused():
    settings = {"model": {"head": {"kind": "logistic"}}, "train": {"feature_views": 0}}
    with pytest.raises(FaceclsError, match="logistic is fitted on stored features"):
        recipe_from_dict(settings)


def _clusters(n: int, seed: int):
    """Three overlapping classes in 16-d (so the fit cannot separate them perfectly: the penalty matters)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=g)
    labels = torch.arange(n) % 3
    return centres[labels] + 1.5 * torch.randn(n, 16, generator=g), labels


def test_logistic_head_reaches_the_optimum_of_its_objective():
    """At the fitted weights the gradient of sum-of-cross-entropies + ||W||^2 / 2C on the unit features
    vanishes (L-BFGS converged), i.e. it is scikit-learn's LogisticRegression(C) solution."""
    features, labels = _clusters(300, 0)
    head = LogisticHead(16, 3, HeadConfig(kind="logistic", c=10.0))
    head.fit(features, labels)
    assert float(head.chosen_c) == 10.0
    unit = torch.nn.functional.normalize(features, dim=1)
    weight = head.linear.weight.detach().clone().requires_grad_(True)
    bias = head.linear.bias.detach().clone().requires_grad_(True)
    objective = torch.nn.functional.cross_entropy(unit @ weight.T + bias, labels, reduction="sum")
    (objective + (weight**2).sum() / 20.0).backward()
    # Against the gradient at zero weights (where a fit from nothing would start): L-BFGS stops when the
    # objective, a sum over 300 rows, changes by less than 1e-9 between iterations, which leaves a
    # gradient orders of magnitude below the starting one.
    zero = torch.zeros(3, 16, requires_grad=True)
    torch.nn.functional.cross_entropy(unit @ zero.T, labels, reduction="sum").backward()
    assert weight.grad.abs().max() < 1e-4 * zero.grad.abs().max() and bias.grad.abs().max() < 1e-2
    at_start = torch.nn.functional.cross_entropy(torch.zeros(300, 3), labels, reduction="sum")
    assert float(objective.detach()) < 0.9 * float(at_start)
    # forward: the same linear map of the L2-normalised features, at any scale of the input
    torch.testing.assert_close(head(3.0 * features), unit @ head.linear.weight.T + head.linear.bias)


def test_logistic_head_chooses_c_by_validation_loss():
    features, labels = _clusters(300, 1)
    val_features, val_labels = _clusters(90, 2)
    chosen = LogisticHead(16, 3, HeadConfig(kind="logistic", c=None))
    chosen.fit(features, labels, val_features, val_labels)
    losses = {}
    for c in LogisticHead.GRID:
        fixed = LogisticHead(16, 3, HeadConfig(kind="logistic", c=c))
        fixed.fit(features, labels)
        with torch.no_grad():
            losses[c] = float(torch.nn.functional.cross_entropy(fixed(val_features), val_labels))
    assert float(chosen.chosen_c) == min(losses, key=losses.get)
    # without a validation split: the default C
    default = LogisticHead(16, 3, HeadConfig(kind="logistic", c=None))
    default.fit(features, labels)
    assert float(default.chosen_c) == LogisticHead.DEFAULT_C

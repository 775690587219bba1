"""Every registered model: forward + backward on a tiny input, output shape, parameter count."""

import pytest
import torch

from facecls.config import HeadConfig, TrainConfig
from facecls.core.errors import FaceclsError
from facecls.engine.builder import backbone_blocks, set_phase
from facecls.models.registry import create_model, list_models

# Backbone parameter counts (no head): torchvision's and facenet's published sizes.
BACKBONE_PARAMS = {
    "resnet50": 23_508_032,
    "mobilenet_v2": 2_223_872,
    "inception_resnet_v1": 23_482_624,
    "sface": 9_642_880,
}
SIZES = {"resnet50": 64, "mobilenet_v2": 64, "inception_resnet_v1": 80, "sface": 112}


def test_registry_lists_the_seed_models():
    assert {"resnet50", "mobilenet_v2", "inception_resnet_v1", "sface"} <= set(list_models())
    with pytest.raises(FaceclsError, match="unknown model 'resnet5'; choose one of"):
        create_model("resnet5", 10)


@pytest.mark.parametrize("name", sorted(BACKBONE_PARAMS))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, head=HeadConfig(hidden=32, dropout=0.5))
    assert sum(p.numel() for p in model.backbone.parameters()) == BACKBONE_PARAMS[name]
    x = torch.randn(2, 3, SIZES[name], SIZES[name])
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_freezing_phases():
    model = create_model("mobilenet_v2", 5)
    set_phase(model, True, TrainConfig())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    set_phase(model, False, TrainConfig(unfreeze="last_params", unfreeze_last_n=15))
    flags = [p.requires_grad for p in model.parameters()]
    assert sum(flags) == 15 and all(flags[-15:])
    set_phase(model, False, TrainConfig(unfreeze="last_blocks", unfreeze_last_n=2))
    blocks = backbone_blocks(model.backbone)
    trainable = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert trainable[-2:] == [True, True] and not any(trainable[:-2])
    set_phase(model, False, TrainConfig())
    assert all(p.requires_grad for p in model.parameters())

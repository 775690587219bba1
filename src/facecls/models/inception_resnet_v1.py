"""InceptionResnetV1 face embedder, state-dict compatible with facenet-pytorch 2.6.0.

facenet-pytorch pins an old torch, so it cannot be a runtime dependency; this is an independent
implementation whose ``state_dict()`` keys, order and shapes are identical to facenet-pytorch's
``InceptionResnetV1``. Its published weight files (``20180402-114759-vggface2.pt``,
``20180408-102900-casia-webface.pt``) therefore load unchanged with ``strict=True`` into a model built
with the matching ``num_classes`` (8631 and 10575). Downloading them is the weights module's job.

Input: RGB batches ``(N, 3, H, W)``, normalised the facenet way (``(pixel - 127.5) / 128``). The native
size is 160x160; any size works from ``MIN_INPUT_SIZE`` = 75 pixels per side upwards (74 leaves nothing
for the last stride-2 reduction). The head pools adaptively, so 112, 160 and 224 all give 512-d
outputs. In train mode the batch needs at least 2 samples (``last_bn`` is a BatchNorm1d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facecls.core.errors import FaceclsError

__all__ = ["FEATURE_DIM", "MIN_INPUT_SIZE", "InceptionResnetV1"]

FEATURE_DIM = 512
"""Width of the embedding produced by ``InceptionResnetV1.embed``."""

MIN_INPUT_SIZE = 75
"""Smallest height/width (pixels) the network accepts."""

# TensorFlow's batch-norm epsilon, which the original FaceNet weights were trained with.
_BN_EPS = 1e-3


class _ConvBnReLU(nn.Module):
    """Bias-free convolution, batch norm, ReLU: the stem unit of every Inception branch."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class _ParallelBranches(nn.Module):
    """Runs ``branch0``, ``branch1``, ... on the same input and concatenates them along channels."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self._num_branches = len(branches)
        for index, branch in enumerate(branches):
            self.add_module(f"branch{index}", branch)

    def branch_outputs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self._num_branches)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_outputs(x)


class _ResidualInception(_ParallelBranches):
    """Inception-ResNet block: concatenated branches, 1x1 projection, scaled residual add, ReLU.

    The projection is called ``conv2d`` and is registered after the branches, as in facenet-pytorch.
    """

    def __init__(
        self, branches: list[nn.Module], branch_channels: int, channels: int, scale: float, activate: bool
    ) -> None:
        super().__init__(branches)
        self.scale = scale
        self.conv2d = nn.Conv2d(branch_channels, channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True) if activate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One pass, x + scale * y, where `y * scale + x` makes two (and the sum is rounded once)
        return self.relu(torch.add(x, self.conv2d(self.branch_outputs(x)), alpha=self.scale))


def _block35(scale: float) -> _ResidualInception:
    """Inception-ResNet-A on the 256-channel 35x35 grid (at 299 px input)."""
    return _ResidualInception(
        [
            _ConvBnReLU(256, 32, 1),
            nn.Sequential(_ConvBnReLU(256, 32, 1), _ConvBnReLU(32, 32, 3, padding=1)),
            nn.Sequential(
                _ConvBnReLU(256, 32, 1), _ConvBnReLU(32, 32, 3, padding=1), _ConvBnReLU(32, 32, 3, padding=1)
            ),
        ],
        branch_channels=96,
        channels=256,
        scale=scale,
        activate=True,
    )


def _block17(scale: float) -> _ResidualInception:
    """Inception-ResNet-B on the 896-channel grid, with factorised 1x7 / 7x1 convolutions."""
    return _ResidualInception(
        [
            _ConvBnReLU(896, 128, 1),
            nn.Sequential(
                _ConvBnReLU(896, 128, 1),
                _ConvBnReLU(128, 128, (1, 7), padding=(0, 3)),
                _ConvBnReLU(128, 128, (7, 1), padding=(3, 0)),
            ),
        ],
        branch_channels=256,
        channels=896,
        scale=scale,
        activate=True,
    )


def _block8(scale: float, activate: bool = True) -> _ResidualInception:
    """Inception-ResNet-C on the 1792-channel grid, with factorised 1x3 / 3x1 convolutions."""
    return _ResidualInception(
        [
            _ConvBnReLU(1792, 192, 1),
            nn.Sequential(
                _ConvBnReLU(1792, 192, 1),
                _ConvBnReLU(192, 192, (1, 3), padding=(0, 1)),
                _ConvBnReLU(192, 192, (3, 1), padding=(1, 0)),
            ),
        ],
        branch_channels=384,
        channels=1792,
        scale=scale,
        activate=activate,
    )


def _reduction_a() -> _ParallelBranches:
    """Mixed_6a: 256 -> 896 channels, halves the grid."""
    return _ParallelBranches(
        [
            _ConvBnReLU(256, 384, 3, stride=2),
            nn.Sequential(
                _ConvBnReLU(256, 192, 1),
                _ConvBnReLU(192, 192, 3, padding=1),
                _ConvBnReLU(192, 256, 3, stride=2),
            ),
            nn.MaxPool2d(3, stride=2),
        ]
    )


def _reduction_b() -> _ParallelBranches:
    """Mixed_7a: 896 -> 1792 channels, halves the grid."""
    return _ParallelBranches(
        [
            nn.Sequential(_ConvBnReLU(896, 256, 1), _ConvBnReLU(256, 384, 3, stride=2)),
            nn.Sequential(_ConvBnReLU(896, 256, 1), _ConvBnReLU(256, 256, 3, stride=2)),
            nn.Sequential(
                _ConvBnReLU(896, 256, 1),
                _ConvBnReLU(256, 256, 3, padding=1),
                _ConvBnReLU(256, 256, 3, stride=2),
            ),
            nn.MaxPool2d(3, stride=2),
        ]
    )


class InceptionResnetV1(nn.Module):
    """FaceNet's InceptionResnetV1 with facenet-pytorch 2.6.0's parameter names and layout.

    Args:
        num_classes: width of the ``logits`` layer (512 -> num_classes). ``None`` builds no
            ``logits`` layer, like facenet-pytorch without ``classify``/``pretrained``; use 8631
            (VGGFace2) or 10575 (CASIA-WebFace) to load a published facenet file strictly.
        classify: if True, ``forward`` returns logits (needs ``num_classes``); otherwise it
            returns the L2-normalised 512-d embedding.
        dropout_prob: dropout applied to the pooled 1792-d features before ``last_linear``.

    ``embed(x)`` returns ``last_bn``'s 512-d output before L2 normalisation, the input for a
    separate classification head.
    """

    def __init__(self, num_classes: int | None = None, classify: bool = False, dropout_prob: float = 0.6) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise FaceclsError(f"num_classes must be a positive number of identities, got {num_classes}")
        if classify and num_classes is None:
            raise FaceclsError(
                "InceptionResnetV1(classify=True) needs num_classes (the number of identities) for its "
                "logits layer; pass num_classes=... or use classify=False for embeddings"
            )
        if not 0.0 <= dropout_prob <= 1.0:
            raise FaceclsError(f"dropout_prob must be between 0 and 1, got {dropout_prob}")
        self.num_classes = num_classes
        self.classify = classify

        self.conv2d_1a = _ConvBnReLU(3, 32, 3, stride=2)
        self.conv2d_2a = _ConvBnReLU(32, 32, 3)
        self.conv2d_2b = _ConvBnReLU(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = _ConvBnReLU(64, 80, 1)
        self.conv2d_4a = _ConvBnReLU(80, 192, 3)
        self.conv2d_4b = _ConvBnReLU(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*(_block35(scale=0.17) for _ in range(5)))
        self.mixed_6a = _reduction_a()
        self.repeat_2 = nn.Sequential(*(_block17(scale=0.10) for _ in range(10)))
        self.mixed_7a = _reduction_b()
        self.repeat_3 = nn.Sequential(*(_block8(scale=0.20) for _ in range(5)))
        self.block8 = _block8(scale=1.0, activate=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout_prob)
        self.last_linear = nn.Linear(1792, FEATURE_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(FEATURE_DIM, eps=_BN_EPS, momentum=0.1)
        if num_classes is not None:
            self.logits = nn.Linear(FEATURE_DIM, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise FaceclsError(f"InceptionResnetV1 expects an RGB batch shaped (N, 3, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise FaceclsError(
                f"input of {x.shape[-2]}x{x.shape[-1]} px is too small for InceptionResnetV1; "
                f"resize faces to at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (native size 160x160)"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the (N, 512) output of ``last_bn``, before L2 normalisation."""
        self._check_input(x)
        x = self.conv2d_1a(x)
        x = self.conv2d_2a(x)
        x = self.conv2d_2b(x)
        x = self.maxpool_3a(x)
        x = self.conv2d_3b(x)
        x = self.conv2d_4a(x)
        x = self.conv2d_4b(x)
        x = self.repeat_1(x)
        x = self.mixed_6a(x)
        x = self.repeat_2(x)
        x = self.mixed_7a(x)
        x = self.repeat_3(x)
        x = self.block8(x)
        x = self.dropout(self.avgpool_1a(x))
        return self.last_bn(self.last_linear(torch.flatten(x, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits if ``classify`` is set, else the L2-normalised 512-d embedding."""
        features = self.embed(x)
        if self.classify:
            return self.logits(features)
        return F.normalize(features, p=2, dim=1)

"""Per-split transforms on uint8 tensors; normalisation happens on the device, batched.

Training images get the recipe's augmentation; val, test and predict images never do (the seed's
notebook set its eval transforms on the shared dataset, so training ran unaugmented: each split here
owns its transform).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from facecls.config import AugmentConfig


def train_transform(input_size: int, augment: AugmentConfig) -> v2.Compose:
    """Augmentation on a uint8 CHW tensor that was resized to ``data.resize``."""
    steps: list[nn.Module] = [v2.RandomResizedCrop(input_size, scale=augment.crop_scale, antialias=True)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.rotation > 0:
        steps.append(v2.RandomRotation(augment.rotation))
    if any(augment.color_jitter):
        b, c, s, h = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    if augment.grayscale > 0:
        steps.append(v2.RandomGrayscale(augment.grayscale))
    return v2.Compose(steps)


def eval_transform() -> None:
    """Evaluation images are only resized (at decode time); no random step at all."""
    return None


class Normalize(nn.Module):
    """uint8 NCHW batch -> float, scaled to [0, 1], minus mean, over std; optional channels_last."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

"""Per-split transforms on uint8 tensors; normalisation happens on the device, batched.

Training images get the recipe's augmentation; val, test and predict images never do (the seed's
notebook set its eval transforms on the shared dataset, so training ran unaugmented: each split here
owns its transform).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from facecls.config import AugmentConfig


def train_transform(input_size: int, augment: AugmentConfig) -> v2.Compose:
    """Augmentation on a uint8 CHW tensor that was resized to ``data.resize``."""
    steps: list[nn.Module] = [v2.RandomResizedCrop(input_size, scale=augment.crop_scale, antialias=True)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.rotation > 0:
        steps.append(RandomRotation(augment.rotation))
    if any(augment.color_jitter):
        b, c, s, h = augment.color_jitter
        steps.append(ColorJitter(brightness=b, contrast=c, saturation=s, hue=h))
    if augment.grayscale > 0:
        steps.append(v2.RandomGrayscale(augment.grayscale))
    return v2.Compose(steps)


def _is_rgb_uint8(inpt: Any) -> bool:
    return type(inpt) is torch.Tensor and inpt.dtype == torch.uint8 and inpt.ndim == 3 and inpt.shape[0] == 3


def rotate_uint8(image: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate a uint8 RGB CHW tensor by ``angle`` degrees about its centre (nearest, same size, black fill)
    with PIL's kernel, i.e. what v2.functional.rotate does to a PIL image."""
    hwc = np.ascontiguousarray(image.numpy().transpose(1, 2, 0))
    out = Image.fromarray(hwc).rotate(angle, resample=Image.Resampling.NEAREST, expand=False, fillcolor=(0, 0, 0))
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1)))


_HUE_SEXTANT_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def _adjust_hue_float(x: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """v2.functional.adjust_hue on a float RGB CHW tensor in [0, 255], about 3x faster: a hue shift keeps each
    pixel's max and min channel, so the result comes straight from (max, max - min, shifted hue) without the
    HSV round trip. A new tensor."""
    r, g, b = x.unbind(0)
    # (torch.aminmax over the channel dimension was 20x slower than these, 0.59 ms at 224 px)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    inv = torch.where(chroma > 0, chroma, 1.0).reciprocal_()
    # hue in sextants [0, 6): red 0, green 2, blue 4 (the same case order as torchvision's _rgb_to_hsv)
    hue = torch.where(
        maxc == r,
        (g - b).mul_(inv),
        torch.where(maxc == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0)),
    )
    hue.add_(6.0 * hue_factor)
    k = (hue + _HUE_SEXTANT_OFFSETS).remainder_(6.0)
    return maxc - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale weights, on a float RGB CHW tensor: 1 x H x W."""
    r, g, b = x.unbind(0)
    return (r * 0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(0)


def color_jitter_uint8(image: torch.Tensor, order: list[int], brightness, contrast, saturation, hue) -> torch.Tensor:
    """v2.ColorJitter's four adjustments (None: skipped) in ``order`` on a uint8 RGB CHW tensor, in one float
    tensor: torchvision converts to float and back to a new uint8 tensor around every step, which was 80%
    of the whole training augmentation's time at 224 px (3.1 of 3.8 ms per image; 1.6 ms now). Each step
    clamps and truncates as torchvision's uint8 path does, so the results agree up to float rounding."""
    x = image.float()
    for fn_id in order:
        if fn_id == 0 and brightness is not None:
            x = x.mul_(brightness).clamp_(0.0, 255.0).floor_()
        elif fn_id == 1 and contrast is not None:
            mean = _grey(x).floor_().mean()  # torchvision takes the mean of the uint8 grey image
            x = x.mul_(contrast).add_(mean * (1.0 - contrast)).clamp_(0.0, 255.0).floor_()
        elif fn_id == 2 and saturation is not None:
            grey = _grey(x).floor_().mul_(1.0 - saturation)
            x = x.mul_(saturation).add_(grey).clamp_(0.0, 255.0).floor_()
        elif fn_id == 3 and hue is not None:
            x = _adjust_hue_float(x, hue).mul_((256.0 - 1e-3) / 255.0).floor_()
    return x.to(torch.uint8)


class RandomRotation(v2.RandomRotation):
    """v2.RandomRotation (nearest, same size, black fill) that turns uint8 RGB tensors with PIL's kernel: the
    same angle draws; 3-10x faster than the tensor kernel's float grid_sample; about 0.1% of the pixels differ
    from it (nearest-neighbour ties), none from torchvision's own PIL path."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not _is_rgb_uint8(inpt) or self.expand or self.center is not None or self.fill != 0:
            return super().transform(inpt, params)
        return rotate_uint8(inpt, params["angle"])


class ColorJitter(v2.ColorJitter):
    """v2.ColorJitter (same random factors and order) that adjusts uint8 RGB tensors in one float pass
    (color_jitter_uint8)."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not _is_rgb_uint8(inpt):
            return super().transform(inpt, params)
        return color_jitter_uint8(
            inpt,
            params["fn_idx"].tolist(),
            params["brightness_factor"],
            params["contrast_factor"],
            params["saturation_factor"],
            params["hue_factor"],
        )


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

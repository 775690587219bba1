"""Datasets and samplers: uint8 images from the decoded cache (or decoded on the fly), labels, and a
seeded, shardable sample order that can start mid-epoch (for exact resume)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from facecls.data.images import DecodedCache, UnreadableImage, load_image

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-(epoch, sample) seed: augmentation does not depend on workers, batch or resume point."""
    return (seed * 1_000_003 + epoch * 7_919 + index * _MIX) % (2**63 - 1)


class FaceImages(Dataset):
    """Labelled images as uint8 CHW tensors; ``index -> (image, label, index)``.

    Reads from a DecodedCache when given one, otherwise decodes the file (same resize code).
    With a transform, the sampler hands in ``(index, seed)`` pairs so each sample's augmentation
    is a pure function of (seed, epoch, index).
    """

    def __init__(
        self,
        paths: list[Path],
        labels: list[int],
        size: int,
        transform=None,
        cache: DecodedCache | None = None,
        cache_rows: list[int] | None = None,
    ):
        self.paths = paths
        self.labels = labels
        self.size = size
        self.transform = transform
        self.cache = cache
        self.cache_rows = cache_rows if cache_rows is not None else list(range(len(paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> torch.Tensor:
        if self.cache is not None:
            array = np.array(self.cache.images[self.cache_rows[index]])
        else:
            array = load_image(self.paths[index], self.size)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.image(index)
        if self.transform is not None:
            # fork_rng: seeding here must not disturb the caller's RNG stream (dropout, workers=0).
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    # The CPU generator alone, which the transforms draw from: torch.manual_seed also queues
                    # a CUDA seeding that records a stack trace on every call, a third of a 112 px sample's
                    # augmentation time on a CUDA build.
                    torch.default_generator.manual_seed(seed)
                image = self.transform(image)
        return image, self.labels[index], index


def _plain_loader(path: Path, size: int) -> tuple[np.ndarray, str]:
    return load_image(path, size), "ok"


class ImageFiles(Dataset):
    """Unlabelled image files for prediction: ``index -> (image, index, status)``.

    ``loader(path, size) -> (uint8 HWC array, status)``; an unreadable file never raises here: its
    status is "unreadable" and the image is zeros, so the caller decides what to do with it.
    """

    def __init__(self, paths: list[Path], size: int, loader=None):
        self.paths = paths
        self.size = size
        self.loader = loader or _plain_loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            array, status = self.loader(self.paths[index], self.size)
        except UnreadableImage:
            array, status = np.zeros((self.size, self.size, 3), np.uint8), "unreadable"
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous(), index, status


class EpochSampler(Sampler):
    """Shuffled (index, augmentation seed) pairs for one process of ``world_size``.

    Like torch's DistributedSampler with ``drop_last=True`` (per-epoch reseeding, ``rank::world_size``
    sharding; the last ``len % world_size`` samples of each epoch's order are left out rather than padded
    with duplicates, so every process gets as many samples and none is trained or counted twice), plus
    ``start``: the number of global samples already consumed this epoch, so a resumed run continues
    mid-epoch with the same order, even on a different number of processes.

    With ``batch_size`` (per process), an epoch whose last batch would hold a single sample drops that
    sample (one per process, a different one each epoch): BatchNorm cannot train on a batch of one.
    """

    def __init__(
        self,
        indices: list[int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        augment_seeds: bool = True,
        batch_size: int | None = None,
    ):
        self.indices = list(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.augment_seeds = augment_seeds
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_order(self) -> list[int]:
        order = self.indices
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=gen).tolist()]
        return order[: self.samples_per_epoch()]

    def samples_per_epoch(self) -> int:
        """Global samples in one epoch: a multiple of the world size, minus a lone tail."""
        total = len(self.indices) // self.world_size * self.world_size
        per_process = total // self.world_size
        if self.batch_size and per_process > 1 and per_process % self.batch_size == 1:
            total -= self.world_size
        return total

    def __iter__(self) -> Iterator:
        order = self.global_order()[self.start :]
        for index in order[self.rank :: self.world_size]:
            if self.augment_seeds:
                yield index, sample_seed(self.seed, self.epoch, index)
            else:
                yield index

    def __len__(self) -> int:
        total = self.samples_per_epoch() - self.start
        return max(0, math.ceil((total - self.rank) / self.world_size))


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Evaluation shard without padding: every sample is seen exactly once over all ranks."""
    return indices[rank::world_size]

"""Stored features: each image's backbone features (raw: what the head takes) computed once per view and
kept on disk, so a frozen backbone never runs twice on the same image, and a second run on the same data
and weights reuses them.

Views of a training image: 0 the image itself, 1 its horizontal mirror, 2 and more random augmentations
of the recipe (seeded per view and image, so they are the same every time). The store is a float16
``views x N x D`` array in ``<cache>/features/<key>-<hash>/features.npy``: ``key`` is the decoded cache's
key of the same files at the input size (paths, sizes, modification times) and ``hash`` covers the
backbone's weights (a SHA-256 of its state dict), the views and the preprocessing and precision.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from facecls.core.console import Console
from facecls.data.datasets import EpochSampler, FaceImages, sample_seed, shard
from facecls.data.images import DecodedCache
from facecls.engine.embeddings import Embedder, compute_embeddings, prepared_backbone
from facecls.runtime.distributed import DistEnv, broadcast_object

FORMAT = "facecls-features-v2"


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and values), in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ViewImages(Dataset):
    """``index -> (uint8 CHW image at the input size, index)`` of one view of ``dataset``'s images."""

    def __init__(self, dataset: FaceImages, view: int, size: int, seed: int):
        self.dataset, self.view, self.size, self.seed = dataset, view, size, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if self.view >= 2 and self.dataset.transform is not None:
            image = self.dataset[(index, sample_seed(self.seed, -self.view, index))][0]
        else:
            image = self.dataset.image(index)
        if tuple(image.shape[-2:]) != (self.size, self.size):
            # A training image is decoded at data.resize: the same square framing, resampled.
            image = F.resize(image, [self.size, self.size], antialias=True)
        if self.view == 1:
            image = torch.flip(image, dims=[2])
        return image, index


def store_folder(embedder: Embedder, dataset: FaceImages, views: int, seed: int, cache_root: Path) -> Path:
    """Where the features of ``dataset`` under ``embedder`` are kept (see the module docstring)."""
    size = embedder.preprocess.input_size
    settings = {
        "format": FORMAT,
        "weights": weights_sha256(embedder.backbone),
        "views": views,
        "preprocess": embedder.preprocess.as_dict(),
        "precision": embedder.runtime.precision,
        "feature_dim": embedder.feature_dim,
    }
    if views > 2 and dataset.transform is not None:
        settings["augment"] = repr(dataset.transform)
        settings["seed"] = seed
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_root) / "features" / f"{DecodedCache.key(dataset.paths, size)}-{digest}"


def load_or_compute(
    embedder: Embedder,
    dataset: FaceImages,
    *,
    views: int,
    seed: int,
    cache_root: Path,
    batch_size: int = 128,
    console: Console | None = None,
    description: str = "features",
) -> tuple[torch.Tensor, bool]:
    """``(views x N x D float16 features, reused)``: read from the store, or computed (without touching the
    global RNG, so a resumed run is the uninterrupted one) and written to it atomically."""
    folder = store_folder(embedder, dataset, views, seed, cache_root)
    file = folder / "features.npy"
    if file.is_file():
        return read_store(folder), True
    out = np.empty((views, len(dataset), embedder.feature_dim), dtype=np.float16)
    prepare = prepared_backbone(embedder, views * len(dataset), batch_size, console=console)
    with torch.random.fork_rng(devices=[]), prepare as model:
        for view in range(views):
            source = ViewImages(dataset, view, embedder.preprocess.input_size, seed)
            label = f"{description} view {view + 1}/{views}"
            out[view] = compute_embeddings(
                embedder,
                source,
                batch_size=batch_size,
                console=console,
                description=label,
                l2_normalize=False,
                model=model,
            )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "features.npy", out)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process stored the same features first
        shutil.rmtree(tmp, ignore_errors=True)
    return torch.from_numpy(out), False


def shared_store(
    embedder: Embedder,
    dataset: FaceImages,
    *,
    views: int,
    seed: int,
    env: DistEnv,
    batch_size: int,
    console: Console | None = None,
    description: str = "features",
) -> tuple[torch.Tensor, str]:
    """`load_or_compute` for a process group: rank 0 reads or computes the store, the others read what it
    wrote. Returns the ``views x N x D`` features and how they were got (for a log line)."""
    from facecls.core.download import cache_dir

    folder, how = None, ""
    if env.is_main:  # the other processes' backbones get rank 0's weights only when DDP wraps them
        started = time.perf_counter()
        features, reused = load_or_compute(
            embedder,
            dataset,
            views=views,
            seed=seed,
            cache_root=cache_dir(),
            batch_size=batch_size,
            console=console,
            description=description,
        )
        folder = store_folder(embedder, dataset, views, seed, cache_dir())
        how = "reused from the cache" if reused else f"computed in {time.perf_counter() - started:.1f} s"
    folder = broadcast_object(env, folder)
    if not env.is_main:
        features = read_store(folder)
    return features, how


def flip_mean(features: torch.Tensor) -> torch.Tensor:
    """``2 x N x D`` stored features of the images and their mirrors as a model with flip TTA computes them:
    their mean, ``1 x N x D``."""
    return features.float().mean(0, keepdim=True).half()


def read_store(folder: Path) -> torch.Tensor:
    """The ``views x N x D`` float16 features kept in ``folder``."""
    return torch.from_numpy(np.load(Path(folder) / "features.npy"))


class StoredFeatures(Dataset):
    """``index -> (float16 feature, label, index)`` over every (view, image) pair: index = view * N + image."""

    def __init__(self, features: torch.Tensor, labels: list[int]):
        self.features, self.labels = features, list(labels)
        self.images = features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0] * self.images

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        view, image = divmod(index, self.images)
        return self.features[view, image], self.labels[image], index


class ToDevice(nn.Module):
    """The stored phase's "normalisation": features to the device as float32."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).float()


def feature_train_loader(dataset: StoredFeatures, batch_size: int, seed: int, rank: int, world: int) -> DataLoader:
    """Shuffled, sharded, resumable batches of stored features (in the main process: they are in memory)."""
    sampler = EpochSampler(list(range(len(dataset))), seed, rank, world, batch_size=batch_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=0, generator=torch.Generator().manual_seed(seed)
    )


def feature_eval_loader(dataset: StoredFeatures, batch_size: int, rank: int, world: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=shard(list(range(len(dataset))), rank, world))


class HeadOnFeatures(nn.Module):
    """A classifier seen from stored features: ``features(x)`` is ``x``, the forward pass is the head's.
    Scoring code written for the whole model (logits, cosines, gallery) runs on it unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.head
        self.feature_dim = model.feature_dim
        self.flip_tta = False  # the stored features already are the mean over the views

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(x.float()) if labels is None else self.head(x.float(), labels)


def stored_eval_loader(
    model: nn.Module,
    dataset: FaceImages,
    *,
    preprocess,
    runtime,
    model_name: str,
    env: DistEnv,
    batch_size: int,
    seed: int = 0,
    console: Console | None = None,
) -> tuple[DataLoader, nn.Module, HeadOnFeatures]:
    """For ``model`` with its pretrained backbone frozen (a trained head): in-order batches of the stored
    features of ``dataset`` as the model sees them (with flip TTA the mean of the image's and its mirror's),
    computed once ever; the "normalisation" that takes them to the device; and the head as a model."""
    from facecls.engine.embeddings import embedder_of

    views = 2 if model.flip_tta else 1
    features, _ = shared_store(
        embedder_of(model, preprocess, runtime, model_name),
        dataset,
        views=views,
        seed=seed,
        env=env,
        batch_size=batch_size,
        console=console,
        description="evaluation features",
    )
    if views == 2:
        features = flip_mean(features)
    loader = feature_eval_loader(StoredFeatures(features, dataset.labels), batch_size, env.rank, env.world_size)
    return loader, ToDevice(runtime.device), HeadOnFeatures(model)

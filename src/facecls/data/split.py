"""A seeded, stratified, leak-free train/val/test split, written as a CSV manifest."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecls.core.atomic import write_bytes
from facecls.core.errors import FaceclsError
from facecls.data.scan import Sample

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestRow:
    path: str
    identity: str
    split: str


def _counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Images per split for an identity with ``n`` images.

    n >= 3: at least one val and one test image (where that fraction is > 0), at least one train.
    n == 2: one train, one val (val fraction > 0) else two train. n == 1: train only.
    """
    _, f_val, f_test = fractions
    if n >= 3:
        n_val = max(1, round(n * f_val)) if f_val > 0 else 0
        n_test = max(1, round(n * f_test)) if f_test > 0 else 0
        while n_val + n_test > n - 1:  # keep one training image
            if n_test >= n_val and n_test > 1 or n_val == 0:
                n_test -= 1
            else:
                n_val -= 1
        return n - n_val - n_test, n_val, n_test
    if n == 2 and f_val > 0:
        return 1, 1, 0
    return n, 0, 0


def stratified_split(
    samples: list[Sample],
    fractions: tuple[float, float, float],
    seed: int,
    fixed_val: list[Sample] | None = None,
) -> list[ManifestRow]:
    """Split per identity with a seeded shuffle; the result depends only on the file list and seed.

    With ``fixed_val`` (a ``val/`` folder), those images form the validation split and the labelled
    train images are split into train/test by the remaining fractions.
    """
    if fixed_val:
        f_train, _, f_test = fractions
        total = f_train + f_test
        fractions = (f_train / total, 0.0, f_test / total)
    by_identity: dict[str, list[str]] = defaultdict(list)
    for sample in samples:
        by_identity[sample.identity].append(sample.path)
    rng = np.random.default_rng(seed)
    rows: list[ManifestRow] = []
    for identity in sorted(by_identity):
        paths = sorted(by_identity[identity])
        order = rng.permutation(len(paths))
        n_train, n_val, _ = _counts(len(paths), fractions)
        for rank, idx in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            rows.append(ManifestRow(paths[idx], identity, split))
    for sample in fixed_val or []:
        rows.append(ManifestRow(sample.path, sample.identity, "val"))
    rows.sort(key=lambda r: (r.path, r.split))
    return rows


def manifest_bytes(rows: list[ManifestRow]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "identity", "split"])
    writer.writerows((r.path, r.identity, r.split) for r in rows)
    return buffer.getvalue().encode("utf-8", "surrogateescape")  # file names that are not UTF-8 survive


def write_manifest(path: Path, rows: list[ManifestRow]) -> str:
    """Write the manifest CSV; returns its SHA-256 (stored in checkpoints)."""
    data = manifest_bytes(rows)
    path = Path(path)
    if not path.is_file() or path.read_bytes() != data:  # a resumed run rewrites the same bytes
        write_bytes(path, data)  # atomic: a killed process never leaves half a manifest
    return hashlib.sha256(data).hexdigest()


def read_manifest(path: Path) -> list[ManifestRow]:
    path = Path(path)
    if not path.is_file():
        raise FaceclsError(f"split manifest {path} not found")
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != ["path", "identity", "split"]:
            raise FaceclsError(f"{path} is not a facecls split manifest (header must be path,identity,split)")
        rows = [ManifestRow(r["path"], r["identity"], r["split"]) for r in reader]
    bad = [r for r in rows if r.split not in SPLITS]
    if bad:
        raise FaceclsError(f"{path}: unknown split '{bad[0].split}' for {bad[0].path}")
    seen: set[str] = set()
    for row in rows:
        if row.path in seen:
            raise FaceclsError(f"{path}: {row.path} appears twice (an image must be in one split only)")
        seen.add(row.path)
    return rows


def manifest_sha256(rows: list[ManifestRow]) -> str:
    return hashlib.sha256(manifest_bytes(rows)).hexdigest()


def class_names_from(rows: list[ManifestRow]) -> list[str]:
    """Identity names in a stable (sorted) order; the class index is the position."""
    return sorted({r.identity for r in rows})

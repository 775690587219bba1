"""``facecls embed``: one L2-normalised embedding per image of a folder, for the user's own clustering or
search, and the helpers the other embedding commands (verify, enrol) share: which embedder, which files.

Output: ``FILE.npy`` (N x D float32) with ``FILE.names.txt`` (the relative path of each row, one a line,
in row order), or ``FILE.parquet`` (columns ``path`` and ``embedding``) when pyarrow is installed. Rows
stream to disk batch by batch, so memory does not grow with the folder. Images that cannot be decoded get
no row: they are counted, listed on the console and written to ``FILE.unreadable.txt``. With
``--detect`` each photo is detected and aligned as ``facecls prepare`` does; a photo without a face is
embedded from a centre crop (``facecls prepare`` lists those, when a list is wanted).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facecls.core.console import Console
from facecls.core.errors import FaceclsError, list_for_error
from facecls.data.scan import is_hidden, is_image_name
from facecls.engine.embeddings import Embedder, EmbedOptions, embedder_from_run, load_embedder, stream_embeddings


def open_embedder(
    run: Path | None,
    model: str | None,
    *,
    weights: str | None = None,
    checkpoint: str = "best",
    offline: bool = False,
    device: str | None = None,
) -> Embedder:
    """The embedder of a trained run, or of a registered model with its pretrained weights (by default
    the first weight set the model declares)."""
    if (run is None) == (model is None):
        raise FaceclsError("give either a RUN folder or --model NAME (not both)")
    if run is not None:
        if weights is not None:
            raise FaceclsError("--weights goes with --model; a run uses its own trained weights")
        return embedder_from_run(run, checkpoint, device)
    from facecls.models.registry import get_entry

    entry = get_entry(model)
    if weights is None:
        if not entry.weights:
            raise FaceclsError(f"model '{model}' has no pretrained weights; embed with a trained RUN instead")
        weights = next(iter(entry.weights))
    return load_embedder(model, weights, offline=offline, device=device)


def find_images(folder: Path) -> tuple[list[Path], list[str]]:
    """Image files anywhere under ``folder`` (sorted by relative path), and the other files' relative
    paths (not images by name: reported, never silently dropped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FaceclsError(f"image folder {folder} does not exist")
    images, others = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            path = Path(root) / name
            (images if is_image_name(name) else others).append(path)
    images.sort(key=lambda p: p.relative_to(folder).as_posix())
    return images, sorted(p.relative_to(folder).as_posix() for p in others if not is_hidden(p.name))


@dataclass
class EmbedSummary:
    out: Path
    names: Path | None
    rows: int
    dim: int
    unreadable: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)


class _NpyWriter:
    """Rows appended to a raw temp file; at the end the .npy header (now that N is known) and the rows."""

    def __init__(self, out: Path):
        self.out, self.names_path = out, out.with_suffix(".names.txt")
        self.rows_tmp = out.with_name(f".{out.name}.rows.tmp")
        self.rows = open(self.rows_tmp, "wb")
        self.names = open(
            self.names_path.with_name(f".{self.names_path.name}.tmp"),
            "w",
            encoding="utf-8",
            errors="surrogateescape",
            newline="\n",
        )
        self.count, self.dim = 0, None

    def write(self, names: list[str], vectors: np.ndarray) -> None:
        self.dim = vectors.shape[1]
        self.rows.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self.names.writelines(f"{n}\n" for n in names)
        self.count += len(names)

    def close(self, dim: int) -> None:
        self.rows.close()
        self.names.close()
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        with open(tmp, "wb") as handle:
            header = {"descr": "<f4", "fortran_order": False, "shape": (self.count, dim)}
            np.lib.format.write_array_header_1_0(handle, header)
            with open(self.rows_tmp, "rb") as rows:
                shutil.copyfileobj(rows, handle, 1 << 20)
        os.replace(tmp, self.out)
        os.replace(self.names.name, self.names_path)
        self.rows_tmp.unlink()

    def abort(self) -> None:
        self.rows.close()
        self.names.close()
        for path in (self.rows_tmp, Path(self.names.name), self.out.with_name(f".{self.out.name}.tmp")):
            path.unlink(missing_ok=True)


class _ParquetWriter:
    def __init__(self, out: Path):
        self.out, self.names_path = out, None
        self.tmp = out.with_name(f".{out.name}.tmp")
        self.writer, self.count = None, 0

    def write(self, names: list[str], vectors: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = vectors.shape[1]
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        table = pa.table(
            {"path": pa.array(names, pa.string()), "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
        )
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        self.count += len(names)

    def close(self, dim: int) -> None:
        if self.writer is None:
            self.write([], np.zeros((0, dim), np.float32))
        self.writer.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _check_out(out: Path) -> None:
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise FaceclsError(
                f"{out}: writing .parquet needs pyarrow (pip install 'facecls[parquet]'); or write .npy"
            ) from None
    elif suffix != ".npy":
        raise FaceclsError(f"--out {out}: choose a .npy (with a .names.txt beside it) or a .parquet file")


def _writer(out: Path) -> _NpyWriter | _ParquetWriter:
    return _ParquetWriter(out) if out.suffix.lower() == ".parquet" else _NpyWriter(out)


def embed_folder(
    run: Path | None,
    images: Path,
    out: Path,
    *,
    model: str | None = None,
    weights: str | None = None,
    checkpoint: str = "best",
    options: EmbedOptions | None = None,
    offline: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> EmbedSummary:
    """Embed every image under ``images`` (any depth) into ``out``; see the module docstring."""
    console = Console(progress=progress)
    out = Path(out)
    options = options or EmbedOptions()
    _check_out(out)  # before any model is loaded
    paths, not_images = find_images(images)
    if not paths:
        raise FaceclsError(f"no images found under {images}")
    relative = [p.relative_to(images).as_posix() for p in paths]
    multiline = [r for r in relative if "\n" in r or "\r" in r] if out.suffix.lower() == ".npy" else []
    if multiline:
        raise FaceclsError(
            f"{len(multiline)} image paths hold a line break, which a names file cannot list: "
            f"{list_for_error([repr(r) for r in multiline])}; rename them"
        )
    embedder = open_embedder(run, model, weights=weights, checkpoint=checkpoint, offline=offline, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = _writer(out)
    unreadable: list[str] = []
    try:
        for indices, vectors, statuses in stream_embeddings(embedder, paths, options, console=console):
            keep = [k for k, s in enumerate(statuses) if s != "unreadable"]
            unreadable += [relative[indices[k]] for k, s in enumerate(statuses) if s == "unreadable"]
            if keep:
                writer.write([relative[indices[k]] for k in keep], vectors[keep])
        writer.close(embedder.feature_dim)
    except BaseException:
        writer.abort()
        raise
    bad_list = out.with_suffix(".unreadable.txt")
    if unreadable:
        bad_list.write_text("".join(f"{n}\n" for n in unreadable), encoding="utf-8", errors="surrogateescape")
        console.warn(
            f"{len(unreadable)} images could not be decoded and have no row: {list_for_error(unreadable)} "
            f"(all listed in {bad_list})"
        )
    else:
        bad_list.unlink(missing_ok=True)
    if not_images:
        console.warn(f"{len(not_images)} files are not images by name and were left out: {list_for_error(not_images)}")
    summary = EmbedSummary(out, writer.names_path, writer.count, embedder.feature_dim, unreadable, not_images)
    names = f" and {summary.names}" if summary.names else ""
    console.print_result(f"wrote {summary.rows} embeddings ({summary.dim}-d) to {out}{names}")
    return summary

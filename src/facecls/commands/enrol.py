"""``facecls enrol``: add identities (and more images of known ones) to an embedding-based run without
retraining, as a new run folder that predict, evaluate and compare use as they are.

The run's classifier must compare embeddings by cosine: one vector per class (a nearest-mean head's
class means; a cosine, arcface or cosface head's class weights), or a kNN head's gallery. A new
identity's vector is the normalised mean of its images' unit embeddings; a known identity's vector
becomes the normalised weighted mean of its current direction (counted as its training images) and the
new embeddings; in a kNN gallery every new image becomes a row. The source run is only read.

NEW_RUN gets the source's files (config, split, metrics, ...), the new ``classes.json`` (new identities
appended, so existing class indices keep their meaning), ``best.ckpt`` with the new head (no optimizer
state: an enrolled run is not resumed), and ``enrol.json`` + ``enrol.csv`` saying what was added.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from facecls.core import runs
from facecls.core.checkpoint import save_checkpoint
from facecls.core.console import Console
from facecls.core.errors import FaceclsError, list_for_error
from facecls.data.scan import scan_identity_folders
from facecls.engine.embeddings import EmbedOptions, embed_files, embedder_of

# Files that describe the source model's own evaluations or checkpoints: not carried over.
_NOT_COPIED = ("best.ckpt", "last.ckpt", "openset.json", "kaggle.json", "classes.json")
_NOT_COPIED_PREFIXES = ("eval_", "per_class_", ".")


@dataclass
class EnrolSummary:
    out: Path
    added: dict[str, int]
    extended: dict[str, int]
    classes: int
    seconds_embedding: float
    seconds_total: float


def gallery_kind(model: torch.nn.Module) -> str:
    """How the run's head keeps its identities: "vectors" (one per class: a cosine/arcface/cosface head's
    ``weight``, a nearest-mean head's ``means``) or "gallery" (a kNN head's labelled unit vectors); a
    clear error for any other head."""
    head = getattr(model, "head", None)
    if isinstance(getattr(head, "gallery", None), torch.Tensor) and hasattr(head, "gallery_labels"):
        return "gallery"
    if hasattr(head, "cosines") or isinstance(getattr(head, "means", None), torch.Tensor):
        return "vectors"
    kind = "linear" if isinstance(head, torch.nn.Sequential) else type(head).__name__
    raise FaceclsError(
        f"enrol needs an embedding-based run (model.head.kind nearest_mean, knn, cosine, arcface or cosface); "
        f"this run's head is {kind}. Train one with e.g. --recipe sface_ncm or --set model.head.kind=cosine"
    )


def _state_key(model_state: dict, name: str) -> str:
    return next(k for k in model_state if k.removeprefix("_orig_mod.").removeprefix("module.") == name)


def _class_vectors(
    old: np.ndarray, sums: np.ndarray, identities: list[str], index: dict[str, int], trained: dict[str, int]
) -> tuple[np.ndarray, list[str]]:
    """Class vectors with ``identities`` merged in: a new identity's vector is the normalised sum of its
    unit embeddings (scaled like the others); a known one's direction counts as its training images."""
    old_norms = np.linalg.norm(old, axis=1)
    typical_norm = float(np.median(old_norms)) if old_norms.size else 1.0
    vectors, new_rows, new_names = old.copy(), [], []
    for k, name in enumerate(identities):
        if name in index:
            i = index[name]
            merged = old[i] / max(old_norms[i], 1e-12) * trained.get(name, 1) + sums[k]
            vectors[i] = merged / max(np.linalg.norm(merged), 1e-12) * old_norms[i]
        else:
            new_rows.append(sums[k] / max(np.linalg.norm(sums[k]), 1e-12) * typical_norm)
            new_names.append(name)
    if new_rows:
        vectors = np.concatenate([vectors, np.stack(new_rows)])
    return vectors, new_names


def _train_counts(run: Path) -> dict[str, int]:
    from facecls.data.split import read_manifest

    counts: dict[str, int] = {}
    for row in read_manifest(run / "split.csv"):
        if row.split == "train":
            counts[row.identity] = counts.get(row.identity, 0) + 1
    return counts


def _copy_run_files(run: Path, out: Path) -> None:
    for entry in sorted(run.iterdir()):
        if entry.name in _NOT_COPIED or entry.name.startswith(_NOT_COPIED_PREFIXES) or not entry.is_file():
            continue
        shutil.copy2(entry, out / entry.name)


def enrol_run(
    run: Path,
    data: Path,
    out: Path,
    *,
    checkpoint: str = "best",
    options: EmbedOptions | None = None,
    flip: bool | None = None,
    progress: bool = True,
) -> EnrolSummary:
    """Write NEW_RUN = ``run`` + the identities of ``data/<identity>/*`` (see the module docstring).
    ``flip`` embeds each image with its mirror, overriding ``options.flip``; None: as the run predicts (its
    flip test-time augmentation)."""
    from facecls.engine.inference import load_run

    started = time.perf_counter()
    console = Console(progress=progress)
    run, data, out = Path(run), Path(data), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FaceclsError(f"--out {out} already exists and is not empty; choose a new folder for the enrolled run")
    if out.resolve() == run.resolve():
        raise FaceclsError("--out must be a new folder: enrol never changes the source run")
    if not data.is_dir():
        raise FaceclsError(f"--data {data} does not exist (expected {data}/<identity>/<image>)")
    loaded = load_run(run, checkpoint)
    kind = gallery_kind(loaded.model)
    if flip is None:
        flip = bool(getattr(loaded.model, "flip_tta", False))
    options = replace(options or EmbedOptions(), flip=flip)
    data = data.absolute()
    samples, skipped = scan_identity_folders(data.parent, data.name)
    if not samples:
        raise FaceclsError(f"no images found under {data}/<identity>/ ({len(skipped)} other files or folders)")
    if skipped:
        console.warn(f"{len(skipped)} files or folders left out: {list_for_error([s.path for s in skipped])}")
    paths = [data.parent / s.path for s in samples]
    embedder = embedder_of(loaded.model, loaded.preprocess, loaded.runtime, loaded.recipe.model.name)
    embed_start = time.perf_counter()
    embeddings, bad = embed_files(embedder, paths, options, console=console, description="enrol")
    unreadable = [samples[i].path for i in bad]
    seconds_embedding = time.perf_counter() - embed_start
    if unreadable:
        raise FaceclsError(
            f"{len(unreadable)} of {len(paths)} images under {data} could not be decoded: "
            f"{list_for_error(unreadable)}; fix or remove them (nothing was written)"
        )

    identities = sorted({s.identity for s in samples})
    position = {name: k for k, name in enumerate(identities)}
    labels = np.array([position[s.identity] for s in samples])
    sums = np.zeros((len(identities), embedder.feature_dim), np.float64)
    np.add.at(sums, labels, embeddings.astype(np.float64))
    counts = np.bincount(labels, minlength=len(identities))

    class_names = list(loaded.class_names)
    index = {name: i for i, name in enumerate(class_names)}
    state = dict(loaded.checkpoint)
    model_state = {k: v.clone() for k, v in state["model"].items()}
    if kind == "gallery":  # kNN: every new image joins the gallery under its (new or known) class
        new_names = [name for name in identities if name not in index]
        lookup = {**index, **{name: len(class_names) + j for j, name in enumerate(new_names)}}
        gallery_key, labels_key = (
            _state_key(model_state, "head.gallery"),
            _state_key(model_state, "head.gallery_labels"),
        )
        rows = torch.from_numpy(embeddings).to(model_state[gallery_key].dtype)
        image_labels = torch.tensor([lookup[s.identity] for s in samples], dtype=model_state[labels_key].dtype)
        model_state[gallery_key] = torch.cat([model_state[gallery_key], rows])
        model_state[labels_key] = torch.cat([model_state[labels_key], image_labels])
    else:
        key = _state_key(model_state, "head.means" if hasattr(loaded.model.head, "means") else "head.weight")
        old = model_state[key].float().numpy().astype(np.float64)
        vectors, new_names = _class_vectors(old, sums, identities, index, _train_counts(run))
        model_state[key] = torch.from_numpy(vectors).to(model_state[key].dtype)
    class_names += new_names
    added = {name: int(counts[k]) for k, name in enumerate(identities) if name in new_names}
    extended = {name: int(counts[k]) for k, name in enumerate(identities) if name not in new_names}
    for name in ("optimizer", "scheduler", "scaler", "rng", "partial"):
        state.pop(name, None)
    state.update(
        model=model_state,
        class_names=class_names,
        enrolled_from={"run": str(run.absolute()), "checkpoint": str(loaded.checkpoint_path)},
    )
    state.pop("format_version", None)

    out.mkdir(parents=True, exist_ok=True)
    _copy_run_files(run, out)
    runs.write_json(out / "classes.json", {"class_names": class_names})
    save_checkpoint(state, out / "best.ckpt")
    with open(out / "enrol.csv", "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["identity", "path", "new_identity"])
        for s in samples:
            writer.writerow([s.identity, str(data.parent / s.path), int(s.identity in added)])
    seconds_total = time.perf_counter() - started
    runs.write_json(
        out / "enrol.json",
        {
            "source_run": str(run.absolute()),
            "source_checkpoint": str(loaded.checkpoint_path),
            "data": str(data),
            "added": added,
            "extended": extended,
            "classes": len(class_names),
            "images": len(samples),
            "flip_tta": flip,
            "detect": options.detect,
            "seconds_embedding": round(seconds_embedding, 3),
            "seconds_total": round(seconds_total, 3),
        },
    )
    console.print_result(
        f"enrolled {len(added)} new identities and {sum(added.values()) + sum(extended.values())} images "
        f"({len(extended)} known identities extended) into {out}: {len(class_names)} classes "
        f"({seconds_total:.1f} s, of which embedding {seconds_embedding:.1f} s)"
    )
    return EnrolSummary(out, added, extended, len(class_names), seconds_embedding, seconds_total)

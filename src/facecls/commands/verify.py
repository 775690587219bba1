"""``facecls verify``: face verification on image pairs, by the LFW protocol.

Each image named in the pairs file is embedded once (L2-normalised, flip TTA unless turned off); a pair's
score is the cosine similarity of its two embeddings. Reported: the 10-fold accuracy (each fold judged
at the threshold with the best accuracy on the other folds; mean and standard deviation over folds) and
the ROC AUC over all pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facecls.commands.embed import open_embedder
from facecls.core.console import Console
from facecls.core.errors import FaceclsError, list_for_error
from facecls.engine.embeddings import EmbedOptions, embed_files
from facecls.engine.openset import VerificationResult, read_pairs, resolve_pair_images, verification_folds


def pair_scores(embeddings: np.ndarray, index: dict[str, int], first: list[str], second: list[str]) -> np.ndarray:
    """Cosine similarity of each pair (rows of ``embeddings`` are unit vectors), in float64."""
    a = embeddings[[index[n] for n in first]].astype(np.float64)
    b = embeddings[[index[n] for n in second]].astype(np.float64)
    return np.einsum("ij,ij->i", a, b)


def verify_pairs(
    run: Path | None,
    pairs_file: Path,
    images: Path,
    *,
    model: str | None = None,
    weights: str | None = None,
    checkpoint: str = "best",
    options: EmbedOptions | None = None,
    out: Path | None = None,
    offline: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> VerificationResult:
    """Verification accuracy (LFW protocol) and ROC AUC of a run's or a model's embeddings on pairs."""
    console = Console(progress=progress)
    pairs = read_pairs(pairs_file)
    options = options or EmbedOptions()
    files = resolve_pair_images(pairs, images)
    embedder = open_embedder(run, model, weights=weights, checkpoint=checkpoint, offline=offline, device=device)
    names = sorted(files)
    paths = [files[n] for n in names]
    embeddings, bad = embed_files(embedder, paths, options, console=console, description="verify")
    unreadable = [names[i] for i in bad]
    if unreadable:
        raise FaceclsError(
            f"{len(unreadable)} of {len(names)} images named in {pairs_file} could not be decoded: "
            f"{list_for_error(sorted(unreadable))}"
        )
    index = {n: i for i, n in enumerate(names)}
    scores = pair_scores(embeddings, index, pairs.first, pairs.second)
    result = verification_folds(scores, pairs.same, pairs.folds)
    folds = len(result.fold_accuracies)
    console.print_result(
        f"verification: accuracy {100 * result.accuracy_mean:.2f}% +- {100 * result.accuracy_std:.2f} "
        f"({folds} folds, {result.pairs} pairs: {int(pairs.same.sum())} same, {int((~pairs.same).sum())} "
        f"different), ROC AUC {result.auc:.4f}, threshold {np.mean(result.fold_thresholds):.4f} (cosine, "
        f"mean over folds)"
    )
    if out is not None:
        record = {
            **result.as_dict(),
            "pairs_file": str(pairs_file),
            "images": str(images),
            "source": str(run) if run is not None else f"model {model}",
            "flip_tta": options.flip,
            "detect": options.detect,
        }
        Path(out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return result

"""``facecls evaluate``: a run's checkpoint on its val or test split -> metrics files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from facecls.core.atomic import atomic_write
from facecls.core.console import Console
from facecls.core.errors import FaceclsError
from facecls.core.run_folder import RunFolder
from facecls.data.scan import escape_name
from facecls.engine.inference import load_run, split_batches, split_dataset
from facecls.engine.steps import evaluate
from facecls.runtime.distributed import DistEnv


def evaluate_run(
    run: Path,
    split: str = "val",
    *,
    checkpoint: str = "best",
    batch_size: int | None = None,
    env: DistEnv | None = None,
    console: Console | None = None,
    quiet: bool = False,
    tta: bool | None = None,
) -> dict:
    """Top-1, top-5, loss, count; writes ``RUN/eval_<split>.json``, ``RUN/per_class_<split>.csv`` and
    ``RUN/predictions_<split>.csv`` (per image: true identity, top-5 identities and probabilities).

    ``env``: the process group the caller joined (default: this process alone)."""
    env = env or DistEnv()
    console = console or Console(enabled=env.is_main)
    loaded = load_run(run, checkpoint, local_rank=env.local_rank, tta=tta)
    folder = RunFolder(run)
    rows = folder.read_split()
    if not any(r.split == split for r in rows):
        raise FaceclsError(f"run {run} has no '{split}' images in its split")
    data_dir = Path(loaded.info["data_dir"])
    data = split_dataset(loaded, rows, split, env)
    dataset = data.datasets[split]
    batch = batch_size or max(1, loaded.recipe.train.batch_size * 2 // env.world_size)
    loader, normalize, model = split_batches(loaded, dataset, env, batch, console)
    preds = evaluate(model, loader, loaded.runtime, normalize, env)
    metrics = preds.metrics(len(loaded.class_names))
    result = {
        "split": split,
        **metrics,
        "unreadable_skipped": len(data.skipped),
        "checkpoint": checkpoint,
        "epoch": int(loaded.checkpoint["epoch"]),
        "model": loaded.recipe.model.name,
        "recipe": loaded.recipe.name,
        "flip_tta": loaded.model.flip_tta,
    }
    if env.is_main:
        from facecls.engine.unknown import evaluate_open_set, wants_open_set

        if wants_open_set(loaded) and len(set(preds.labels.tolist())) >= 2:
            result["open_set"] = evaluate_open_set(loaded, split, batch_size=batch_size, console=console)
        _write_per_class(folder.per_class_csv(split), preds, loaded.class_names)
        relative = [Path(os.path.relpath(p, data_dir)).as_posix() for p in dataset.paths]
        write_predictions(folder.predictions_csv(split), preds, relative, loaded.class_names)
        folder.write_eval(split, result)
        if not quiet:
            console.print_result(
                f"{split}: top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  "
                f"loss {metrics['loss']:.4f}  ({metrics['count']} images)"
            )
            if "open_set" in result:
                o = result["open_set"]
                at = (
                    f"threshold {o['threshold']:.4f} (FAR {o['threshold_far']:g} on val): open-set accuracy "
                    f"{100 * o['open_set_accuracy']:.2f}% (known identified {100 * o['known_identified']:.2f}%, "
                    f"unknown rejected {100 * o['unknown_rejected']:.2f}%)"
                    if "threshold" in o
                    else "no threshold (no validation split to measure one on)"
                )
                console.print_result(
                    f"{split} open set ({o['score']}, identities held out of the gallery in turn): TAR@FAR 1% "
                    f"{100 * o['tar@far=0.01']:.2f}%  TAR@FAR 0.1% {100 * o['tar@far=0.001']:.2f}%  {at}"
                )
    return result


PREDICTION_COLUMNS = ["path", "identity", "correct", "true_score"] + [
    f"{kind}_{k}" for k in range(1, 6) for kind in ("pred", "score")
]


def write_predictions(path: Path, preds, image_paths: list[str], class_names: list[str]) -> None:
    """One row per evaluated image: its path (relative to the data folder), true identity, whether top-1
    is right, the probability of the true identity, and the top-5 identities with their probabilities
    (fewer when the run has fewer than 5 classes)."""
    k = min(5, len(class_names))
    true_scores = np.exp(-preds.losses.astype(np.float64))  # cross-entropy = -log p(true identity)
    names = [escape_name(name) for name in class_names]  # UTF-8 CSV whatever the file names (see escape_name)
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for i, index in enumerate(preds.indices):
            label = preds.labels[i]
            correct = int(preds.top5[i, 0] == label)
            row = [escape_name(image_paths[index]), names[label], correct, f"{true_scores[i]:.6f}"]
            for j in range(5):
                row += [names[preds.top5[i, j]], f"{preds.top5_scores[i, j]:.6f}"] if j < k else ["", ""]
            writer.writerow(row)


def _write_per_class(path: Path, preds, class_names: list[str]) -> None:
    n = len(class_names)
    totals = np.bincount(preds.labels, minlength=n)
    correct = np.bincount(preds.labels[preds.top5[:, 0] == preds.labels], minlength=n)
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["identity", "count", "correct", "accuracy"])
        for i, name in enumerate(class_names):
            if totals[i]:
                writer.writerow([escape_name(name), int(totals[i]), int(correct[i]), round(correct[i] / totals[i], 6)])

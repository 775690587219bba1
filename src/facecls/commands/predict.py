"""``facecls predict``: a trained run on a flat folder of images -> Kaggle submission CSV."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from facecls.core.atomic import atomic_write
from facecls.core.console import Console
from facecls.core.errors import FaceclsError, list_for_error
from facecls.data.datasets import ImageFiles, shard
from facecls.data.images import unreadable_files
from facecls.data.scan import escape_name, list_flat_images
from facecls.engine.inference import inference_model, load_run, predict_loader
from facecls.engine.unknown import UNKNOWN_LABEL, best_scores, class_scores
from facecls.faces.align import DetectLoader
from facecls.runtime.distributed import DistEnv, broadcast_object, gather_objects
from facecls.runtime.speed import CompiledInference, Runtime


@dataclass
class PredictSummary:
    out: Path
    rows: int
    skipped: list[str] = field(default_factory=list)
    no_face: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)


def report_compile_failure(model: torch.nn.Module, console: Console) -> None:
    if isinstance(model, CompiledInference) and model.failure:
        console.warn(f"torch.compile failed, predicted without it ({model.failure})")


@torch.inference_mode()
def predict_batches(
    model: torch.nn.Module,
    loader: DataLoader,
    normalize: torch.nn.Module,
    runtime: Runtime,
    unknown: float | None = None,
):
    """Yield ``(predicted class indices, dataset indices, statuses)`` per batch (model in eval mode).
    With an ``unknown`` threshold, an image whose score (see facecls.engine.unknown.class_scores) is below it
    gets class -1."""
    for images_u8, idx, status in loader:
        x = normalize(images_u8)
        if unknown is None:
            with runtime.autocast():
                pred = model(x).argmax(1).cpu().tolist()
        else:
            with runtime.autocast():
                logits, scores = class_scores(model, x)
            best, top = best_scores(model, logits, scores)
            pred = torch.where(best.double() >= unknown, top, -1).cpu().tolist()
        yield pred, idx.tolist(), status


def predict_folder(
    run: Path,
    images: Path,
    out: Path,
    *,
    checkpoint: str = "best",
    skip_unreadable: bool = False,
    detect: bool = False,
    detector: Path | None = None,
    margin: float = 0.0,
    batch_size: int = 128,
    compile_inference: bool | None = None,
    backend: str | None = None,
    onnx_model: Path | None = None,
    progress: bool = True,
    tta: bool | None = None,
    unknown: str | None = None,
    far: float = 0.01,
    env: DistEnv | None = None,
) -> PredictSummary:
    """One row per image (``image_name,label``), sorted by name. Rows stream to the file, so memory
    does not grow with the folder. Unreadable images fail the run up front unless skipped.
    With ``unknown`` ("auto" or a threshold), faces scoring below the threshold are labelled ``unknown``
    (see facecls.engine.unknown; "auto" measures the threshold for the false-accept rate ``far``).
    Two backends: PyTorch on a run folder's checkpoint, or onnxruntime on an exported model, when ``run``
    is a ``.onnx`` file or ``onnx_model`` is given (then checked against the run folder ``run``).
    ``env``: the process group the caller joined (default: this process alone)."""
    out = Path(out)
    if out.is_dir():
        raise FaceclsError(f"--out {out} is a folder; name the CSV file to write, e.g. {out / 'submission.csv'}")
    env = env or DistEnv()
    console = Console(enabled=env.is_main, progress=progress)
    if onnx_model is None and Path(run).suffix.lower() == ".onnx":
        onnx_model, run = Path(run), None
    if onnx_model is not None:
        if compile_inference:
            raise FaceclsError("--compile applies to the PyTorch backend; an ONNX model runs through onnxruntime")
        if backend not in (None, "auto"):
            raise FaceclsError("--backend applies to a run folder; an ONNX model runs through onnxruntime")
        if checkpoint != "best":
            raise FaceclsError("--checkpoint picks a run's checkpoint; an ONNX model is one (see export --checkpoint)")
        if unknown is not None:
            raise FaceclsError("--unknown needs the run folder's embeddings; predict with the run, not an ONNX model")
        from facecls.runtime.onnx_model import load_onnx_predictor

        loaded = load_onnx_predictor(onnx_model, run)
    else:
        loaded = load_run(run, checkpoint, local_rank=env.local_rank, tta=tta)
    open_set = None
    if unknown is not None:
        from facecls.engine.unknown import resolve_threshold

        if UNKNOWN_LABEL in loaded.class_names:
            raise FaceclsError(f"run {run} has a class named '{UNKNOWN_LABEL}'; --unknown cannot label faces with it")
        threshold = resolve_threshold(loaded, unknown, far, console=console) if env.is_main else None
        open_set = broadcast_object(env, threshold)
    paths, left_out = list_flat_images(images)
    # Hidden files (.DS_Store, ._*) are a file manager's, not the user's: not worth a line.
    not_images = [f.path for f in left_out if f.reason != "hidden file"]
    bad = [paths[i].name for i in unreadable_files(paths)] if env.is_main else None
    bad = broadcast_object(env, bad)  # every process stops, or none
    if bad and not skip_unreadable:
        raise FaceclsError(
            f"{len(bad)} of {len(paths)} images in {images} are unreadable ({list_for_error(bad)}); "
            "fix or remove them, or pass --skip-unreadable to leave them out of the submission"
        )
    loader_fn = DetectLoader(detector, margin) if detect else None
    dataset = ImageFiles(paths, loaded.preprocess.input_size, loader_fn)
    indices = shard(list(range(len(paths))), env.rank, env.world_size)
    runtime = loaded.runtime
    if compile_inference is not None:
        runtime = dataclasses.replace(runtime, compile_inference=compile_inference)
    if backend is not None:
        runtime = dataclasses.replace(runtime, inference_backend=backend)
    loader = predict_loader(dataset, batch_size, runtime, indices)
    if onnx_model is not None:
        model = loaded.model
    else:
        model = inference_model(loaded.model, runtime, loaded.preprocess.input_size, len(paths), batch_size, console)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped, no_face, written = [], [], 0
    bar = console.progress("predict", len(indices))
    local_rows: list[tuple[int, str]] = []
    with contextlib.ExitStack() as stack:
        writer = None
        if env.is_main and not env.enabled:  # rows stream straight into the (temporary) output file
            writer = csv.writer(stack.enter_context(atomic_write(out, "w", newline="")))
            writer.writerow(["image_name", "label"])
        for pred, idx, status in predict_batches(model, loader, loaded.normalize, runtime, open_set):
            for i, p, s in zip(idx, pred, status, strict=True):
                name = paths[i].name
                if s == "unreadable":
                    skipped.append(name)
                    continue
                if s == "no-face":
                    no_face.append(name)
                label = loaded.class_names[p] if p >= 0 else UNKNOWN_LABEL
                if writer:
                    writer.writerow([escape_name(name), escape_name(label)])
                    written += 1
                else:
                    local_rows.append((i, label))
            bar.advance(len(pred))
        bar.close()
        if env.enabled:
            parts = gather_objects(env, (local_rows, skipped, no_face))
            if env.is_main:
                merged = sorted(r for part in parts for r in part[0])
                skipped = sorted(n for part in parts for n in part[1])
                no_face = sorted(n for part in parts for n in part[2])
                if not skipped or skip_unreadable:
                    with atomic_write(out, "w", newline="") as h:
                        w = csv.writer(h)
                        w.writerow(["image_name", "label"])
                        for i, label in merged:
                            w.writerow([escape_name(paths[i].name), escape_name(label)])
                written = len(merged)
        report_compile_failure(model, console)
        if env.is_main and skipped and not skip_unreadable:  # raised inside: the temp file goes, out stays
            raise FaceclsError(
                f"{len(skipped)} images could not be decoded ({list_for_error(skipped)}); nothing written. "
                "Pass --skip-unreadable to leave them out."
            )
    if not env.is_main:
        return PredictSummary(out, 0)
    summary = PredictSummary(out, written, skipped, no_face, not_images)
    if detect:
        report = out.with_name(out.stem + "_detect_report.csv")
        no_face_set, skipped_set = set(no_face), set(skipped)
        with atomic_write(report, "w", newline="") as h:
            w = csv.writer(h)
            w.writerow(["image_name", "status"])
            for p in paths:
                status = "unreadable" if p.name in skipped_set else "aligned"
                if p.name in no_face_set:
                    status = "no-face (centre crop)"
                w.writerow([escape_name(p.name), status])
        console.log(
            f"detection: {len(paths) - len(no_face) - len(skipped)} aligned, {len(no_face)} without a face "
            f"(predicted on a centre crop); see {report}"
        )
    if skipped:
        console.warn(f"skipped {len(skipped)} unreadable images: {list_for_error(skipped)}")
    if not_images:
        listed = list_for_error(not_images)
        console.warn(f"{len(not_images)} entries of {images} are not images and have no row: {listed}")
    console.log(f"wrote {written} rows to {out}")
    return summary

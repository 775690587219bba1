"""``facecls prepare``: detect, pick and align the face in every image of a raw folder.

Input: ``raw_dir/<identity>/<image>`` or a flat folder of images (any nesting is mirrored).
Output: the same relative paths under ``out_dir``, one aligned ``size`` x ``size`` RGB crop per image
in which a face was found, plus ``prepare_report.csv`` (one row per input file) and
``prepare_config.json`` (the crop settings, checked when a run is resumed).

File names: an output keeps the input's relative path and file name, extension included, so
predictions on prepared crops map straight back to the raw names. ``.png``, ``.bmp``, ``.tif``/``.tiff``
and ``.webp`` (lossless) are written losslessly in their own format; ``.jpg``/``.jpeg``/``.jpe``/``.jfif``
as JPEG at quality 95 without chroma subsampling. Any other name (``.gif``, ``.pgm``, no extension,
...) gets ``.png`` appended (``a.gif`` -> ``a.gif.png``). The report's ``output`` column gives the
written path of every row.

Hidden files and folders (``.DS_Store``, ``._*``, ``.git``) are skipped silently; every other file is
an input, and those Pillow cannot decode are reported as ``unreadable``.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from facecls.core.atomic import atomic_write, write_text
from facecls.core.console import progress_bar
from facecls.core.errors import FaceclsError
from facecls.data.images import UnreadableImage, die_with_parent, open_rgb
from facecls.data.scan import PREPARE_CONFIG, PREPARE_REPORT, is_hidden
from facecls.faces.align import FaceAligner, FaceReport
from facecls.faces.detect import Pick, find_yunet_onnx, import_cv2
from facecls.runtime.machine import available_cpus

REPORT_COLUMNS = ("file", "faces_found", "box", "score", "status", "output", "detail")

_JPEG_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif"}
_SAVE_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    ".png": ("PNG", {}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {}),
    ".tiff": ("TIFF", {}),
    ".webp": ("WEBP", {"lossless": True}),
    **{suffix: ("JPEG", {"quality": 95, "subsampling": 0}) for suffix in _JPEG_SUFFIXES},
}


@dataclass(frozen=True)
class PrepareSummary:
    """Counts for one ``prepare_folder`` run; ``done_before`` outputs existed already and were kept."""

    total: int
    aligned: int
    center_crop: int
    no_face: int
    unreadable: int
    done_before: int
    report_path: Path
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "report_path": str(self.report_path)}


def list_inputs(raw_dir: Path, skipped: list[Path] | None = None) -> list[Path]:
    """Every non-hidden file under ``raw_dir``, as sorted paths relative to it.

    Symlinked folders directly under ``raw_dir`` (identity folders kept elsewhere) are followed; a
    symlinked folder deeper down is not (it could loop back) and is appended to ``skipped``."""
    raw_dir = Path(raw_dir)
    found = []
    tops = [raw_dir]
    while tops:
        top = tops.pop()
        for root, dirs, files in os.walk(top):
            for d in list(dirs):
                if not is_hidden(d) and os.path.islink(os.path.join(root, d)):
                    dirs.remove(d)
                    link = Path(root) / d
                    if Path(root) == raw_dir:
                        tops.append(link)
                    elif skipped is not None:
                        skipped.append(link.relative_to(raw_dir))
            dirs[:] = sorted(d for d in dirs if not is_hidden(d))
            for name in files:
                if not is_hidden(name):
                    found.append((Path(root) / name).relative_to(raw_dir))
    if skipped is not None:
        skipped.sort(key=lambda p: p.as_posix())
    return sorted(found, key=lambda p: p.as_posix())


def output_path(relative: Path) -> Path:
    """Where the crop of input ``relative`` is written, relative to ``out_dir`` (see module doc)."""
    return relative if relative.suffix.lower() in _SAVE_OPTIONS else relative.with_name(relative.name + ".png")


def _save_atomic(crop: Any, path: Path) -> None:
    """Write via a temporary file so an interrupted run never leaves a half-written crop to resume from."""
    image_format, options = _SAVE_OPTIONS.get(path.suffix.lower(), ("PNG", {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        Image.fromarray(crop).save(handle, format=image_format, **options)


def _process(aligner: FaceAligner, raw_dir: Path, out_dir: Path, relative: Path) -> dict[str, str]:
    try:
        image = open_rgb(raw_dir / relative)
    except UnreadableImage as exc:
        crop, report = None, FaceReport("unreadable", detail=str(exc).strip())
    else:
        crop, report = aligner(image)
    written = ""
    if crop is not None:
        target = output_path(relative)
        _save_atomic(crop, out_dir / target)
        written = target.as_posix()
    return _row(relative, report, written)


def _row(relative: Path, report: FaceReport, output: str) -> dict[str, str]:
    box = " ".join(str(round(v)) for v in report.box) if report.box is not None else ""
    return {
        "file": relative.as_posix(),
        "faces_found": "" if report.status == "unreadable" else str(report.faces_found),
        "box": box,
        "score": f"{report.score:.3f}" if report.score is not None else "",
        "status": report.status,
        "output": output,
        "detail": report.detail,
    }


# One aligner per worker process, built by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(aligner_options: dict[str, Any], raw_dir: Path, out_dir: Path) -> None:
    die_with_parent()
    import_cv2().setNumThreads(1)  # parallelism comes from the processes
    _WORKER.update(aligner=FaceAligner(**aligner_options), raw_dir=raw_dir, out_dir=out_dir)


def _work(chunk: list[Path]) -> list[dict[str, str]]:
    return [_process(_WORKER["aligner"], _WORKER["raw_dir"], _WORKER["out_dir"], relative) for relative in chunk]


def _default_workers() -> int:
    return max(1, min(available_cpus(), 8))


def _check_dirs(raw_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    raw_dir, out_dir = raw_dir.expanduser().resolve(), out_dir.expanduser().resolve()
    if not raw_dir.is_dir():
        raise FaceclsError(f"raw image folder {raw_dir} does not exist or is not a folder")
    if out_dir == raw_dir or out_dir.is_relative_to(raw_dir) or raw_dir.is_relative_to(out_dir):
        raise FaceclsError(
            f"output folder {out_dir} must not be, contain or sit inside the raw folder {raw_dir}; "
            "choose a separate --out folder"
        )
    return raw_dir, out_dir


def _check_config(out_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to resume into a folder whose crops were made with different geometry."""
    path = out_dir / PREPARE_CONFIG
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
        if changed:
            details = ", ".join(f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise FaceclsError(
                f"{out_dir} holds crops prepared with other settings ({details}); "
                "use a new output folder or delete this one"
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(config, indent=2) + "\n")


def _previous_rows(report_path: Path) -> dict[str, dict[str, str]]:
    if not report_path.is_file():
        return {}
    with report_path.open(newline="") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def _write_report(path: Path, rows: list[dict[str, str]]) -> None:
    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["file"]))


def _run(
    pending: list[Path],
    aligner: FaceAligner,
    aligner_options: dict[str, Any],
    raw_dir: Path,
    out_dir: Path,
    workers: int,
) -> Iterator[dict[str, str]]:
    if workers == 1:
        for relative in pending:
            yield _process(aligner, raw_dir, out_dir, relative)
        return
    # spawn, not fork: a forked child inherits OpenCV / torch thread pools in an undefined state.
    # ProcessPoolExecutor, not Pool: a worker that dies fails the run instead of being respawned forever.
    size = max(1, min(16, len(pending) // (workers * 4)))
    chunks = [pending[i : i + size] for i in range(0, len(pending), size)]
    executor = ProcessPoolExecutor(
        workers, multiprocessing.get_context("spawn"), _init_worker, (aligner_options, raw_dir, out_dir)
    )
    try:
        for future in as_completed([executor.submit(_work, chunk) for chunk in chunks]):
            yield from future.result()
    except BrokenProcessPool as exc:
        raise FaceclsError(
            "a face-alignment worker process died (out of memory, or a script calling prepare_folder "
            'without an `if __name__ == "__main__":` guard); rerun to resume, or use --workers 1'
        ) from exc
    finally:
        # on an error or Ctrl-C, drop the queued chunks instead of waiting for them
        executor.shutdown(wait=True, cancel_futures=True)


def prepare_folder(
    raw_dir: Path,
    out_dir: Path,
    *,
    size: int = 112,
    margin: float = 0.0,
    pick: Pick = "largest",
    fallback_center_crop: bool = False,
    detector: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareSummary:
    """Detect and align the face in every image under ``raw_dir`` into ``out_dir``; resumable.

    Outputs that already exist are kept and counted as done before. Images without a face are
    listed as ``no-face`` (or centre-cropped with ``fallback_center_crop``); files that cannot be
    decoded are listed as ``unreadable``. ``workers``: processes (default: available CPUs, at most 8).
    """
    start = time.perf_counter()
    raw_dir, out_dir = _check_dirs(Path(raw_dir), Path(out_dir))
    if workers is not None and workers < 1:
        raise FaceclsError(f"workers must be at least 1, got {workers}")
    detector_path = find_yunet_onnx(detector)
    aligner_options = {
        "size": size,
        "margin": margin,
        "pick": pick,
        "fallback_center_crop": fallback_center_crop,
        "detector": detector_path,
    }
    # built here so a bad setting fails once with its real message, not in every worker
    aligner = FaceAligner(**aligner_options)
    _check_config(out_dir, {"size": size, "margin": margin, "pick": pick})

    report_path = out_dir / PREPARE_REPORT
    previous = _previous_rows(report_path)
    rows, pending = [], []
    linked_folders: list[Path] = []
    inputs = list_inputs(raw_dir, linked_folders)
    if not inputs:
        raise FaceclsError(f"no files under {raw_dir} (hidden files are ignored); point it at your raw images")
    for relative in inputs:
        target = output_path(relative)
        if (out_dir / target).is_file():
            old = previous.get(relative.as_posix(), {})
            rows.append(
                {
                    **{k: old.get(k, "") for k in ("faces_found", "box", "score", "detail")},
                    "file": relative.as_posix(),
                    "status": "skipped-existing",
                    "output": target.as_posix(),
                }
            )
        else:
            pending.append(relative)
    done_before = len(rows)
    for folder in linked_folders:
        rows.append(
            {
                **dict.fromkeys(REPORT_COLUMNS, ""),
                "file": folder.as_posix() + "/",
                "status": "skipped-symlink",
                "detail": "symlinked folder inside an identity folder: not followed",
            }
        )

    workers = min(workers or _default_workers(), max(1, len(pending)))
    if len(pending) < 8:
        workers = 1  # starting processes costs more than a handful of images
    results = _run(pending, aligner, aligner_options, raw_dir, out_dir, workers)
    with progress_bar(f"aligning faces ({workers} workers)", len(pending), enabled=progress and bool(pending)) as bar:
        for row in results:
            rows.append(row)
            bar.advance()
    _write_report(report_path, rows)

    counts = Counter(row["status"] for row in rows)
    return PrepareSummary(
        total=len(rows),
        aligned=counts["aligned"],
        center_crop=counts["center-crop"],
        no_face=counts["no-face"],
        unreadable=counts["unreadable"],
        done_before=done_before,
        report_path=report_path,
        seconds=round(time.perf_counter() - start, 3),
    )

"""``facecls score``: a submission against a solution file, as the leaderboard computes it."""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import dataclass
from pathlib import Path

from facecls.core.errors import FaceclsError
from facecls.core.run_folder import RunFolder

HEADER = ["image_name", "label"]


@dataclass(frozen=True)
class Score:
    accuracy: float
    correct: int
    total: int


def record_score(run: Path, score: Score, submission: Path) -> None:
    """Write ``RUN/kaggle.json``, where ``compare`` reads the Kaggle column from."""
    RunFolder(run).write_kaggle(
        {"accuracy": score.accuracy, "correct": score.correct, "total": score.total, "submission": str(submission)}
    )


def read_text_any(path: Path, what: str) -> str:
    """A CSV file's text: UTF-8 (with or without BOM), UTF-16 (with BOM, as spreadsheets save it), or
    Latin-1 for a file that is neither (every byte is a Latin-1 character; an old tool's export)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FaceclsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise FaceclsError(f"{what} {path} starts like UTF-16 text but is not; save it as UTF-8 CSV") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if b"\0" in data:
        raise FaceclsError(f"{what} {path} is not a text file (it holds NUL bytes); save it as UTF-8 CSV")
    return data.decode("latin-1")


def read_labels(path: Path, what: str) -> dict[str, str]:
    """``image_name -> label``; refuses a wrong header and duplicate names. Image names are kept exactly
    (``' x.pgm'`` and ``'x.pgm'`` are two files); labels lose surrounding spaces."""
    path = Path(path)
    if not path.is_file():
        raise FaceclsError(f"{what} file {path} not found")
    reader = csv.reader(io.StringIO(read_text_any(path, what), newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != HEADER:
        raise FaceclsError(f"{what} {path} must start with the header 'image_name,label', got {header}")
    labels: dict[str, str] = {}
    duplicates = []
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < 2:
            raise FaceclsError(f"{what} {path}, line {line}: expected 'image_name,label', got {row}")
        name, label = row[0], row[1].strip()
        if name in labels:
            duplicates.append(name)
        labels[name] = label
    if duplicates:
        raise FaceclsError(f"{what} {path} lists {len(duplicates)} image names twice (first: {duplicates[0]})")
    return labels


def score_submission(submission: Path, solution: Path) -> Score:
    """Top-1 accuracy over the solution's images; missing or extra image names are errors."""
    predicted = read_labels(submission, "submission")
    truth = read_labels(solution, "solution")
    if not truth:
        raise FaceclsError(f"solution {solution} has a header but no rows: nothing to score against")
    missing = sorted(set(truth) - set(predicted))
    extra = sorted(set(predicted) - set(truth))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} solution images have no row (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} rows name images not in the solution (first: {extra[0]})")
        raise FaceclsError(f"submission {submission} does not match the solution: " + "; ".join(parts))
    correct = sum(predicted[name] == label for name, label in truth.items())
    return Score(correct / len(truth) if truth else 0.0, correct, len(truth))

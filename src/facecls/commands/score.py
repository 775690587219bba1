"""``facecls score``: a submission against a solution file, as the leaderboard computes it."""

from __future__ import annotations

import csv
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


def read_labels(path: Path, what: str) -> dict[str, str]:
    """``image_name -> label``; refuses a wrong header and duplicate names."""
    path = Path(path)
    if not path.is_file():
        raise FaceclsError(f"{what} file {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
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
            name, label = row[0].strip(), row[1].strip()
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

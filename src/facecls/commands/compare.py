"""``facecls compare``: the seed's results table from run folders' result files (never retrains)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from facecls.core.atomic import atomic_write, write_text
from facecls.core.errors import FaceclsError
from facecls.core.run_folder import RunFolder

DISPLAY_NAMES = {
    "resnet50": "ResNet-50",
    "mobilenet_v2": "MobileNetV2",
    "inception_resnet_v1": "InceptionResNetV1",
    "sface": "SFace",
}
COLUMNS = ["Model", "Validation Accuracy (%)", "Test Accuracy (%)", "Kaggle Score (%)"]


@dataclass
class Row:
    model: str
    run: str
    val: float | None
    test: float | None
    kaggle: float | None


def parse_kaggle(items: list[str]) -> dict[str, float]:
    """``NAME=SCORE`` pairs (SCORE in percent); NAME is a run folder name, recipe or model name."""
    scores = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            scores[name.strip()] = float(value.strip().rstrip("%"))
        except ValueError:
            raise FaceclsError(
                f"bad --kaggle '{item}': use NAME=SCORE with SCORE in percent, e.g. resnet50=50.0"
            ) from None
    return scores


def collect_rows(run_dirs: list[Path], kaggle: dict[str, float] | None = None) -> list[Row]:
    kaggle = dict(kaggle or {})
    rows = []
    for run in map(Path, run_dirs):
        folder = RunFolder(run)
        info = folder.read_info()
        val, test = folder.read_eval("val"), folder.read_eval("test")
        if val is None and test is None:
            raise FaceclsError(f"{run} has no results yet: run `facecls evaluate {run} --split test` first")
        score = None
        for key in (run.name, info.get("recipe"), info.get("model")):
            if key in kaggle:
                score = kaggle.pop(key)
                break
        recorded = folder.read_kaggle()
        if score is None and recorded is not None:
            score = 100 * recorded["accuracy"]
        name = DISPLAY_NAMES.get(info.get("model"), info.get("model", run.name))
        rows.append(
            Row(
                name,
                run.name,
                100 * val["top1"] if val else None,
                100 * test["top1"] if test else None,
                score,
            )
        )
    if kaggle:
        raise FaceclsError(f"--kaggle names no given run: {', '.join(kaggle)}")
    names = [r.model for r in rows]
    for row in rows:
        if names.count(row.model) > 1:
            row.model = f"{row.model} ({row.run})"
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def best_index(rows: list[Row]) -> int | None:
    def key(r: Row) -> float:
        return r.test if r.test is not None else r.val if r.val is not None else -1.0

    return max(range(len(rows)), key=lambda i: key(rows[i])) if rows else None


def row_cells(row: Row) -> list[str]:
    """The table's cells for one run, in the order of ``COLUMNS``."""
    return [row.model, _fmt(row.val), _fmt(row.test), _fmt(row.kaggle)]


def to_markdown(rows: list[Row]) -> str:
    best = best_index(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("-" * (len(c) + 2) for c in COLUMNS) + "|"]
    for i, r in enumerate(rows):
        cells = row_cells(r)
        if i == best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[Row], prefix: Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, csv_path = prefix.with_suffix(".md"), prefix.with_suffix(".csv")
    write_text(md, to_markdown(rows))
    with atomic_write(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "run", "val_acc", "test_acc", "kaggle"])
        for r in rows:
            writer.writerow([r.model, r.run, *("" if v is None else round(v, 4) for v in (r.val, r.test, r.kaggle))])
    return md, csv_path

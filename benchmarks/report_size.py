"""How large `facecls report` makes its page for a run with many identities, and how long it takes.

Builds a synthetic run folder (no training): N identities with real face images from the repository's
tests/faces_data (symlinked, cycled), a split manifest, metrics.csv, eval_test.json, per_class_test.csv and
predictions_test.csv with seeded random top-5 predictions at about the given accuracy; then writes the
report and prints its size, the number of inlined images and the seconds taken.

    python benchmarks/report_size.py --identities 7000 --workdir /tmp/report-size
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from facecls.commands.evaluate import PREDICTION_COLUMNS  # noqa: E402
from facecls.commands.report import write_report  # noqa: E402
from facecls.core.console import Console  # noqa: E402
from facecls.core.runs import write_json  # noqa: E402
from facecls.runtime.machine import cpu_text  # noqa: E402


def _faces(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".png", ".pgm"))
    if not files:
        raise SystemExit(f"no face images under {folder}")
    return files


def make_synthetic_run(
    workdir: Path,
    identities: int,
    per_identity: int = 3,
    accuracy: float = 0.6,
    seed: int = 0,
    faces: Path | None = None,
) -> Path:
    """A run folder ``workdir/run`` with its data folder ``workdir/data``; returns the run folder."""
    rng = np.random.default_rng(seed)
    faces_dir = faces or ROOT / "tests" / "faces_data"
    sources = _faces(faces_dir / "five_celebrity") + _faces(faces_dir / "orl")
    if workdir.exists():
        shutil.rmtree(workdir)
    data, run = workdir / "data", workdir / "run"
    run.mkdir(parents=True)
    names = [f"id{i:05d}" for i in range(identities)]
    split_rows, test_rows = [], []
    for i, name in enumerate(names):
        folder = data / "train" / name
        folder.mkdir(parents=True)
        for k in range(per_identity):
            source = sources[(i * per_identity + k) % len(sources)]
            target = folder / f"{k}{source.suffix}"
            os.symlink(source, target)
            split = "train" if k == 0 else "test"
            split_rows.append((f"train/{name}/{target.name}", name, split))
            if split == "test":
                test_rows.append((f"train/{name}/{target.name}", i))
    with open(run / "split.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "identity", "split"), *split_rows])
    write_json(run / "classes.json", {"class_names": names})
    write_json(
        run / "run.json",
        {
            "data_dir": str(data.resolve()),
            "model": "mobilenet_v2",
            "recipe": "mobilenet_v2",
            "num_classes": identities,
            "preprocess": {"input_size": 112, "resize": 128, "mean": [0.5] * 3, "std": [0.5] * 3},
            "weights": {"name": "none"},
            "environment": {"facecls": "synthetic"},
            "completed": True,
        },
    )
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr"])
        for epoch in range(1, 11):
            writer.writerow([epoch, "finetune", 8 / epoch, 0.09 * epoch, 8.5 / epoch, 0.06 * epoch, 0.08 * epoch, 1e-3])
    totals, correct_counts = np.zeros(identities, int), np.zeros(identities, int)
    rows, correct_all, top5_all, loss_all = [], [], [], []
    for path, label in test_rows:
        right = rng.random() < accuracy
        others = rng.choice(identities - 1, size=5, replace=False)
        others = np.where(others >= label, others + 1, others)
        top = [label, *others[:4]] if right else list(others)
        if not right and rng.random() < 0.5:  # half of the mistakes still have the identity in their top-5
            top[int(rng.integers(1, 5))] = label
        scores = np.sort(rng.dirichlet(np.ones(6)))[::-1][:5]
        true_score = float(scores[top.index(label)]) if label in top else float(rng.random() * scores[-1])
        row = [path, names[label], int(right), f"{true_score:.6f}"]
        for name_index, score in zip(top, scores, strict=True):
            row += [names[name_index], f"{score:.6f}"]
        rows.append(row)
        totals[label] += 1
        correct_counts[label] += right
        correct_all.append(right)
        top5_all.append(label in top)
        loss_all.append(-np.log(max(true_score, 1e-12)))
    with open(run / "predictions_test.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([PREDICTION_COLUMNS, *rows])
    with open(run / "per_class_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["identity", "count", "correct", "accuracy"])
        for i, name in enumerate(names):
            if totals[i]:
                writer.writerow([name, totals[i], correct_counts[i], round(correct_counts[i] / totals[i], 6)])
    write_json(
        run / "eval_test.json",
        {
            "split": "test",
            "count": len(rows),
            "top1": float(np.mean(correct_all)),
            "top5": float(np.mean(top5_all)),
            "loss": float(np.mean(loss_all)),
            "unreadable_skipped": 0,
            "checkpoint": "best",
            "epoch": 10,
            "model": "mobilenet_v2",
            "recipe": "mobilenet_v2",
        },
    )
    (run / "skipped_files.csv").write_text("path,reason\n")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=7000)
    parser.add_argument("--per-identity", type=int, default=3, help="images per identity: 1 train + the rest test")
    parser.add_argument("--max-errors", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("report-size"))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    started = time.perf_counter()
    run = make_synthetic_run(args.workdir, args.identities, args.per_identity)
    made = time.perf_counter() - started
    started = time.perf_counter()
    summary = write_report([run], args.workdir / "report.html", max_errors=args.max_errors, console=Console())
    seconds = time.perf_counter() - started
    result = {
        "identities": args.identities,
        "test_images": args.identities * (args.per_identity - 1),
        "max_errors": args.max_errors,
        "page_bytes": summary.bytes,
        "inlined_images": summary.thumbnails,
        "report_seconds": round(seconds, 2),
        "synthetic_run_seconds": round(made, 2),
        "cpu": cpu_text(),
    }
    print(
        f"{args.identities} identities, {result['test_images']} test images: page {summary.bytes / 1e6:.2f} MB, "
        f"{summary.thumbnails} inlined images, written in {seconds:.1f} s ({result['cpu']})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

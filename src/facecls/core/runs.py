"""Run files: atomic writes, the recipe and run.json read back, metrics.csv and its plot, the recorded
environment. Which file is where, and the run as a whole: facecls.core.run_folder."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from facecls import __version__
from facecls.config import Recipe, recipe_from_dict, recipe_to_dict
from facecls.core.errors import FaceclsError


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    import numpy
    import torch
    import torchvision

    return {
        "facecls": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "git_revision": git_revision(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "command": sys.argv,
    }


def write_json(path: Path, data: dict) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str, errors: str = "strict") -> None:
    """Write via a temp file and a rename, so a killed process never leaves half a file behind.
    ``errors="surrogateescape"`` writes file names that are not UTF-8 back as they were read."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(text, encoding="utf-8", errors=errors)
    os.replace(tmp, path)


def write_config(run: Path, recipe: Recipe) -> None:
    write_text_atomic(run / "config.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def read_run_recipe(run: Path) -> Recipe:
    path = run / "config.yaml"
    if not path.is_file():
        raise FaceclsError(f"{run} is not a facecls run folder (no config.yaml); train one with `facecls train`")
    return recipe_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def read_run_info(run: Path) -> dict:
    path = run / "run.json"
    if not path.is_file():
        raise FaceclsError(f"{run} is not a facecls run folder (no run.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop rows for epochs after the checkpoint (they will be trained again), and a row
    that a killed process left half written. Replaces the file atomically."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if None not in r.values() and r["epoch"].isdigit()]
    rows = [r for r in rows if int(r["epoch"]) <= epochs_done]
    if not rows:
        path.unlink()
        return
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue().encode("utf-8"))
    os.replace(tmp, path)


def curves_figure(rows: list[dict]):
    """train/val loss and accuracy, and the learning rate, per epoch (``metrics.csv`` rows): a matplotlib
    figure, saved as ``curves.png`` by training and drawn as SVG by ``facecls report``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [int(r["epoch"]) for r in rows]

    def col(name: str) -> list[float]:
        return [float(r[name]) if r.get(name) not in (None, "") else float("nan") for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, col("train_loss"), "o-", label="train")
    axes[0].plot(epochs, col("val_loss"), "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [100 * v for v in col("train_acc")], "o-", label="train")
    axes[1].plot(epochs, [100 * v for v in col("val_acc")], "o-", label="val")
    axes[1].set_title("top-1 accuracy (%)")
    axes[2].plot(epochs, col("lr"), "o-")
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    return fig


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    """train/val loss and accuracy, and the learning rate, per epoch."""
    rows = read_metrics(metrics_csv)
    if not rows:
        return
    import matplotlib.pyplot as plt

    fig = curves_figure(rows)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)

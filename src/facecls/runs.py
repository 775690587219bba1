"""The run folder: what a training run writes and what evaluate/predict/compare read back.

RUN/
  config.yaml        resolved recipe          run.json       data dir, preprocessing, weights, env
  split.csv          split manifest           classes.json   class names (index = position)
  metrics.csv        per-epoch metrics        curves.png     loss / accuracy / lr per epoch
  last.ckpt best.ckpt                         skipped_files.csv
  eval_<split>.json  per_class_<split>.csv    predictions_<split>.csv   (from evaluate)
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from facecls import __version__
from facecls.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint
from facecls.config import Preprocess, Recipe, recipe_from_dict, recipe_to_dict
from facecls.data.scan import SkippedFile, read_skipped, write_skipped
from facecls.data.split import ManifestRow, read_manifest, write_manifest
from facecls.errors import FaceclsError


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


RUN_FILES = ("config.yaml", "run.json", "split.csv")
"""What a run folder holds once set-up is done: enough to resume it (from scratch without a checkpoint)."""


@dataclass
class Resume:
    """What continuing a run needs: its recipe, data folder and split, and the checkpoint to restore
    (None: no checkpoint was written yet, so the run starts again from the beginning)."""

    recipe: Recipe
    data_dir: Path
    manifest: Path
    checkpoint: dict | None

    @property
    def epochs_done(self) -> int:
        return int(self.checkpoint["epoch"]) if self.checkpoint is not None else 0

    def check(self, manifest_sha256: str, class_names: list[str], run: Path) -> None:
        """The checkpoint must belong to the split the run reads now."""
        if self.checkpoint is None:
            return
        if self.checkpoint["manifest_sha256"] != manifest_sha256:
            raise FaceclsError(f"{run}/split.csv changed since the checkpoint was written; cannot resume")
        if list(self.checkpoint["class_names"]) != class_names:
            raise FaceclsError("the checkpoint's class list differs from the run's split; cannot resume")

    def describe(self, run: Path) -> str:
        if self.checkpoint is None:
            return f"no checkpoint in {run} yet: starting it again from the beginning (same recipe and split)"
        if self.epochs_done >= self.recipe.train.epochs:
            return f"{run} finished training before its final evaluation; evaluating now"
        return f"resuming {run} at epoch {self.epochs_done + 1}, step {self.checkpoint['step_in_epoch']}"


class RunFolder:
    """Every file of one run: where it lives, how it is written, how it is read back."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # ---- paths -------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info(self) -> Path:
        return self.path / "run.json"

    @property
    def split(self) -> Path:
        return self.path / "split.csv"

    @property
    def classes(self) -> Path:
        return self.path / "classes.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def skipped(self) -> Path:
        return self.path / "skipped_files.csv"

    def checkpoint(self, name: str) -> Path:
        """``best`` or ``last`` (or a file name in the folder)."""
        return self.path / (name if name.endswith(".ckpt") else f"{name}.ckpt")

    def eval_json(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def per_class_csv(self, split: str) -> Path:
        return self.path / f"per_class_{split}.csv"

    def predictions_csv(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    # ---- starting and resuming ---------------------------------------------------------------------
    def create(self) -> None:
        """A fresh run: refuse a folder that already holds one, else create it."""
        if any((self.path / name).exists() for name in ("last.ckpt", "metrics.csv", "config.yaml")):
            raise FaceclsError(
                f"{self.path} already holds a run: resume it with --resume {self.path}, or choose another --out"
            )
        if self.path.exists() and not self.path.is_dir():
            raise FaceclsError(f"--out {self.path} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)

    def resume(self, is_main: bool = True) -> Resume:
        """Everything continuing this run needs; the main process also tidies the folder for it (temp
        files of killed checkpoint saves go; metrics rows of epochs after the checkpoint go, since those
        epochs are trained again)."""
        if not self.path.is_dir():
            raise FaceclsError(f"nothing to resume: run folder {self.path} does not exist")
        missing = [name for name in RUN_FILES if not (self.path / name).is_file()]
        if missing:
            raise FaceclsError(
                f"nothing to resume in {self.path}: not a facecls run folder (no {missing[0]}); "
                "start a new run with --recipe and --data instead of --resume"
            )
        if is_main:
            remove_stale_temp_files(self.path)
        last = self.checkpoint("last")
        state = load_checkpoint(last) if last.is_file() else None
        recipe = self.read_recipe()
        info = self.read_info()
        if info.get("completed"):
            raise FaceclsError(
                f"run {self.path} already finished its {recipe.train.epochs} epochs; nothing to resume "
                f"(evaluate it with `facecls evaluate {self.path}`, or train a new run with another --out)"
            )
        resume = Resume(recipe, Path(info["data_dir"]), self.split, state)
        if is_main:
            truncate_metrics(self.metrics, resume.epochs_done)
            plot_curves(self.metrics, self.curves)
        return resume

    # ---- writing -----------------------------------------------------------------------------------
    def write_split(self, rows: list[ManifestRow]) -> str:
        return write_manifest(self.split, rows)

    def write_skipped(self, skipped: list[SkippedFile], manifest: Path | None = None) -> list[SkippedFile]:
        """Record the files left out. A run that reads its own split keeps what the first scan left out
        (hidden files, ...), which a scan of the split alone cannot see. Returns the recorded list."""
        if manifest is not None and manifest.resolve() == self.split.resolve():
            earlier = read_skipped(self.skipped)
            known = {s.path for s in earlier}
            skipped = earlier + [s for s in skipped if s.path not in known]
        write_skipped(self.skipped, skipped)
        return skipped

    def write_setup(self, info: dict, class_names: list[str], recipe: Recipe) -> None:
        """run.json (``info`` over what it held), classes.json and config.yaml."""
        earlier = self.read_info() if self.info.exists() else {}
        write_json(self.info, {**earlier, **info})
        write_json(self.classes, {"class_names": class_names})
        write_config(self.path, recipe)

    def save_checkpoint(self, name: str, state: dict) -> None:
        save_checkpoint(state, self.checkpoint(name))

    def append_metrics(self, row: dict) -> None:
        """One epoch's row, and the curves redrawn."""
        append_metrics(self.metrics, row)
        plot_curves(self.metrics, self.curves)

    def mark_completed(self) -> None:
        write_json(self.info, {**self.read_info(), "completed": True})

    def write_eval(self, split: str, result: dict) -> None:
        write_json(self.eval_json(split), result)

    # ---- reading -----------------------------------------------------------------------------------
    def read_recipe(self) -> Recipe:
        return read_run_recipe(self.path)

    def read_info(self) -> dict:
        return read_run_info(self.path)

    def read_class_names(self) -> list[str]:
        return json.loads(self.classes.read_text(encoding="utf-8"))["class_names"]

    def read_preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.read_info()["preprocess"])

    def read_split(self) -> list[ManifestRow]:
        return read_manifest(self.split)

    def find_checkpoint(self, checkpoint: str = "best") -> Path:
        """``best`` (``last`` when no best was written), ``last``, or a checkpoint file's path."""
        if checkpoint not in ("best", "last"):
            return Path(checkpoint)
        path = self.checkpoint(checkpoint)
        if checkpoint == "best" and not path.exists() and self.checkpoint("last").exists():
            return self.checkpoint("last")
        return path

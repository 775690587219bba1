"""Run files: atomic writes, the recipe and run.json read back, metrics.csv and its plot, the recorded
environment. Which file is where, and the run as a whole: facecls.core.run_folder."""

from __future__ import annotations

import csv
import fcntl
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
from facecls.core import atomic
from facecls.core.errors import FaceclsError, first_line
from facecls.runtime.allocator import jemalloc_dirty_decay_ms


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
        "jemalloc_dirty_decay_ms": jemalloc_dirty_decay_ms(),  # -1: freed memory kept (runtime/allocator.py)
        "command": sys.argv,
    }


def write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file and a rename, so a killed process never leaves half a file behind."""
    atomic.write_text(path, text)


def write_config(run: Path, recipe: Recipe) -> None:
    write_text_atomic(run / "config.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _read_run_file(run: Path, name: str, parse):
    """``parse(text)`` of RUN/NAME; a missing, unreadable, empty or garbled file is one clear error."""
    path = run / name
    if not path.is_file():
        raise FaceclsError(f"{run} is not a facecls run folder (no {name}); train one with `facecls train`")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FaceclsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip():
        try:
            return parse(text)
        except FaceclsError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as exc:
            what = f"not a valid {name} ({first_line(exc, 120)})"
    else:
        what = "empty" if text is not None else "not UTF-8 text"
    raise FaceclsError(
        f"{path} is damaged ({what}): restore it from a backup, or train the run again "
        "(evaluate and predict need config.yaml, run.json and classes.json)"
    )


def _mapping(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping at the top, got {type(value).__name__}")
    return value


def read_run_recipe(run: Path) -> Recipe:
    return _read_run_file(run, "config.yaml", lambda text: recipe_from_dict(_mapping(yaml.safe_load(text))))


def read_run_info(run: Path) -> dict:
    return _read_run_file(run, "run.json", lambda text: _mapping(json.loads(text)))


def read_class_names(run: Path) -> list[str]:
    def parse(text: str) -> list[str]:
        names = _mapping(json.loads(text))["class_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError("class_names must be a non-empty list of names")
        return names

    return _read_run_file(run, "classes.json", parse)


LOCK_FILE = ".lock"


class RunLock:
    """An exclusive ``flock`` on RUN/.lock, held while a process writes the run folder. The kernel drops it
    when the process dies in any way, so a killed run never leaves a stale lock; the file stays."""

    def __init__(self, run: Path):
        self.run = Path(run)
        path = self.run / LOCK_FILE
        if not os.access(self.run, os.W_OK | os.X_OK):
            raise FaceclsError(f"run folder {self.run} is not writable (permission denied)")
        try:  # O_CLOEXEC: a program this process starts must not hold the lock on
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise FaceclsError(f"cannot lock run folder {self.run}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            raise FaceclsError(
                f"run folder {self.run} is in use by another facecls process (PID {holder}); "
                "wait for it to finish, stop it, or choose another --out"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            # Unlock first: forked children (loader workers that outlive the run in this process) share
            # the open file description, and closing only this process's descriptor would keep it locked.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# metrics.csv's columns that depend on the machine's speed and load: a resumed or repeated run matches
# the others digit for digit, not these.
TIMING_COLUMNS = ("seconds", "train_img_per_s", "data_wait_pct")


def append_metrics(path: Path, row: dict) -> None:
    """Add one epoch's row. The file (a few KB: one row per epoch) is written anew through the atomic
    writer, so a kill or a full disk leaves the previous rows intact and never half a row. A run begun by
    a facecls whose rows had other columns (resumed after an upgrade) gets one header for all: the union,
    with the cells a row never had left empty."""
    earlier = path.read_bytes() if path.exists() else b""
    rows = [row]
    fieldnames = list(row)
    if earlier:
        reader = csv.DictReader(io.StringIO(earlier.decode("utf-8"), newline=""))
        header = reader.fieldnames or []
        if header != fieldnames:
            rows = [*reader, row]
            fieldnames = [*header, *(k for k in fieldnames if k not in header)]
            earlier = b""
    with atomic.atomic_write(path, "wb") as handle:
        handle.write(earlier)
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval="")
        if not earlier:
            writer.writeheader()
        writer.writerows(rows)
        handle.write(buffer.getvalue().encode("utf-8"))


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
    with atomic.atomic_write(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)


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
    with atomic.atomic_write(out_png, "wb") as handle:
        fig.savefig(handle, dpi=90, format="png")
    plt.close(fig)

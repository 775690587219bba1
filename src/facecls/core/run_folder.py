"""The run folder: every file a training run writes and evaluate, predict, score and compare read back.

RUN/
  config.yaml        resolved recipe          run.json       data dir, preprocessing, weights, env
  split.csv          split manifest           classes.json   class names (index = position)
  metrics.csv        per-epoch metrics        curves.png     loss / accuracy / lr per epoch
  last.ckpt best.ckpt                         skipped_files.csv
  eval_<split>.json  per_class_<split>.csv    predictions_<split>.csv   (from evaluate)
  kaggle.json                                 (from score --run)
  .lock              held (flock) by the process that writes the run; see runs.RunLock

Writes go through the helpers in facecls.core.runs, over the one atomic writer (facecls.core.atomic).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from facecls.config import Preprocess, Recipe
from facecls.core import runs
from facecls.core.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint
from facecls.core.errors import FaceclsError
from facecls.data.scan import SkippedFile, read_skipped, write_skipped
from facecls.data.split import ManifestRow, read_manifest, write_manifest

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

    def describe(self, run: Path, trained: bool) -> str:
        """The log line on the resume (``trained``: the checkpoint is of a run that trained every epoch)."""
        if self.checkpoint is None:
            return f"no checkpoint in {run} yet: starting it again from the beginning (same recipe and split)"
        if trained:
            return f"{run} finished training before its final evaluation; evaluating now"
        return f"resuming {run} at epoch {self.epochs_done + 1}, step {self.checkpoint['step_in_epoch']}"


class RunFolder:
    """Every file of one run: where it lives, how it is written, how it is read back."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.lock: runs.RunLock | None = None  # held while this process writes the run (create, resume)

    def __str__(self) -> str:
        return str(self.path)

    def require(self) -> None:
        """Refuse, in words a user can act on, a path that is not an existing folder."""
        if self.path.is_file():
            hint = (
                ": `facecls predict` runs exported models; the other commands take the run folder it came from"
                if self.path.suffix.lower() == ".onnx"
                else ""
            )
            raise FaceclsError(f"{self.path} is a file, not a run folder (recipe.yaml, run.json, best.ckpt){hint}")
        if not self.path.is_dir():
            raise FaceclsError(f"run folder {self.path} does not exist")

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

    @property
    def kaggle(self) -> Path:
        return self.path / "kaggle.json"

    # ---- starting and resuming ---------------------------------------------------------------------
    def create(self) -> None:
        """A fresh run: create the folder and lock it (:meth:`release` unlocks); refuse a folder that
        already holds a run. The check runs with the lock held, so two trainings can never both decide
        that one folder is theirs."""
        if self.path.exists() and not self.path.is_dir():
            raise FaceclsError(f"--out {self.path} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FaceclsError(f"cannot create run folder {self.path}: {exc.strerror or exc}") from None
        with self._locked():
            if any((self.path / name).exists() for name in ("last.ckpt", "metrics.csv", "config.yaml")):
                raise FaceclsError(
                    f"{self.path} already holds a run: resume it with --resume {self.path}, or choose another --out"
                )

    def resume(self, is_main: bool = True) -> Resume:
        """Everything continuing this run needs. The main process locks the folder first (:meth:`release`
        unlocks) and tidies it for the resume: temp files of killed saves go, and metrics rows of epochs
        after the checkpoint go, since those epochs are trained again."""
        if not self.path.is_dir():
            raise FaceclsError(f"nothing to resume: run folder {self.path} does not exist")
        with self._locked() if is_main else contextlib.nullcontext():
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
                    f"run {self.path} already finished training; nothing to resume "
                    f"(evaluate it with `facecls evaluate {self.path}`, or train a new run with another --out)"
                )
            resume = Resume(recipe, Path(info["data_dir"]), self.split, state)
            if is_main:
                runs.truncate_metrics(self.metrics, resume.epochs_done)
                runs.plot_curves(self.metrics, self.curves)
        return resume

    @contextlib.contextmanager
    def _locked(self):
        """Take the run lock, kept after the block; released again if the block fails."""
        self.lock = runs.RunLock(self.path)
        try:
            yield
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unlock the folder (a no-op when this process did not lock it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
        runs.write_json(self.info, {**earlier, **info})
        runs.write_json(self.classes, {"class_names": class_names})
        runs.write_config(self.path, recipe)

    def save_checkpoint(self, name: str, state: dict) -> None:
        save_checkpoint(state, self.checkpoint(name))

    def append_metrics(self, row: dict, redraw: bool = True) -> None:
        """One epoch's row, and (``redraw``) the curves redrawn."""
        runs.append_metrics(self.metrics, row)
        if redraw:
            self.plot_curves()

    def plot_curves(self) -> None:
        runs.plot_curves(self.metrics, self.curves)

    def mark_completed(self) -> None:
        runs.write_json(self.info, {**self.read_info(), "completed": True})

    def write_eval(self, split: str, result: dict) -> None:
        runs.write_json(self.eval_json(split), result)

    def write_kaggle(self, score: dict) -> None:
        runs.write_json(self.kaggle, score)

    # ---- reading -----------------------------------------------------------------------------------
    def read_recipe(self) -> Recipe:
        return runs.read_run_recipe(self.path)

    def read_info(self) -> dict:
        return runs.read_run_info(self.path)

    def read_class_names(self) -> list[str]:
        return runs.read_class_names(self.path)

    def read_preprocess(self) -> Preprocess:
        try:
            return Preprocess.from_dict(self.read_info()["preprocess"])
        except (KeyError, TypeError, ValueError):
            raise FaceclsError(f"{self.info} is damaged (no valid 'preprocess' entry); train the run again") from None

    def read_eval(self, split: str) -> dict | None:
        """``evaluate``'s result on ``split`` (None: not evaluated on it)."""
        return _read_json_if_there(self.eval_json(split))

    def read_kaggle(self) -> dict | None:
        return _read_json_if_there(self.kaggle)

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


def _read_json_if_there(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

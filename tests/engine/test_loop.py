"""The training core: the builder returns a whole run without writing anything, the loop with the recipe's
phases and callbacks trains exactly what ``facecls train`` trains, and a new phase plugs in unchanged."""

from __future__ import annotations

import csv
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from facecls.cli import main
from facecls.commands.train import seed_everything
from facecls.config import load_recipe
from facecls.core.run_folder import RunFolder
from facecls.core.runs import TIMING_COLUMNS
from facecls.engine.builder import TrainingSetup, build_training
from facecls.engine.loop import Callback, EpochEnd, Loop, Phase, recipe_phases, run_callbacks
from facecls.engine.steps import RunningStats
from facecls.runtime.speed import resolve_runtime

TINY = [
    "model.weights=none",
    "data.input_size=16",
    "data.resize=18",
    "train.epochs=2",
    "train.frozen_epochs=1",
    "train.feature_views=0",
    "train.batch_size=4",
    "speed.precision=fp32",
    "speed.workers=0",
    "speed.threads=1",
    "optim.finetune_lr=0.0004",
    "scheduler.patience=0",
]


@pytest.fixture
def data(faces_data, tmp_path, monkeypatch) -> Path:
    """4 ORL identities x 6 images: 16 training images, 4 steps per epoch."""
    monkeypatch.setenv("FACECLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FACECLS_OFFLINE", "1")
    threads = torch.get_num_threads()
    for i in range(1, 5):
        folder = tmp_path / "data" / "train" / f"s{i}"
        folder.mkdir(parents=True)
        for j in range(1, 7):
            shutil.copy(faces_data / "orl" / f"s{i}" / f"{j}.pgm", folder)
    yield tmp_path / "data"
    torch.set_num_threads(threads)


# The head on stored features (two views) for at most 2 epochs, then one epoch of fine-tuning.
STORED = ["train.feature_views=2", "train.head_max_epochs=2"]


def _setup(data: Path, extra: tuple[str, ...] = ()) -> TrainingSetup:
    recipe = load_recipe("mobilenet_v2", [*TINY, *extra])
    runtime = resolve_runtime(recipe.speed, "cpu")
    torch.set_num_threads(runtime.threads)
    seed_everything(recipe.train.seed)
    return build_training(recipe, data, runtime)


def _metrics(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


def test_builder_returns_the_whole_run_and_writes_nothing(data):
    before = sorted(p for p in data.rglob("*"))
    setup = _setup(data)
    assert sorted(p for p in data.rglob("*")) == before
    assert setup.class_names == ["s1", "s2", "s3", "s4"]
    assert {k: len(v) for k, v in setup.data.datasets.items()} == {"train": 16, "val": 4, "test": 4}
    assert setup.micro_batch == 4 and setup.steps_per_epoch == 4 and setup.val_loader is not None
    assert setup.preprocess.input_size == 16 and setup.weights == {"name": "none"}
    assert isinstance(setup.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert not os.path.exists(Path.cwd() / "runs" / "mobilenet_v2")


@pytest.mark.parametrize(
    "extra, phases", [((), ["frozen", "finetune"]), (tuple(STORED), ["features", "features", "finetune"])]
)
def test_loop_trains_what_the_train_command_trains(data, tmp_path, extra, phases):
    """Same data, recipe and seed: the loop driven here and ``facecls train`` write the same metrics."""
    command_run = tmp_path / "command"
    args = ["train", "--recipe", "mobilenet_v2", "--data", str(data), "--out", str(command_run), "--no-progress"]
    assert main([*args, *(a for item in [*TINY, *extra] for a in ("--set", item))]) == 0

    setup = _setup(data, extra)
    folder = RunFolder(tmp_path / "loop")
    folder.create()
    Loop(setup, recipe_phases(setup), run_callbacks(folder, setup)).fit()
    folder.release()
    # One process, the same operations in the same order: equal to the digits metrics.csv prints.
    assert _metrics(folder.metrics) == _metrics(command_run / "metrics.csv")
    assert [r["phase"] for r in _metrics(folder.metrics)] == phases
    assert folder.checkpoint("last").is_file() and folder.checkpoint("best").is_file()
    # Every epoch says what share of its time it waited for its loader (of images, or of stored features).
    with open(command_run / "metrics.csv", newline="", encoding="utf-8") as handle:
        waits = [float(r["data_wait_pct"]) for r in csv.DictReader(handle)]
    assert len(waits) == len(phases) and all(0.0 < w < 100.0 for w in waits), waits


class _HeadOnly(Phase):
    """A phase of another kind: one optimizer step per epoch on the first training batch."""

    name = "head-only"

    def __init__(self, until: int):
        self.until = until

    def done(self, loop: Loop) -> bool:
        return loop.state.epoch >= self.until

    def enter(self, loop: Loop) -> torch.nn.Module:
        loop.model.backbone.requires_grad_(False)
        return loop.wrap()

    def train_epoch(self, loop: Loop, model: torch.nn.Module) -> RunningStats:
        s = loop.setup
        images, labels, _ = next(iter(s.train_loader))
        model.train()
        s.optimizer.zero_grad()
        logits = model(s.normalize(images))
        loss = s.criterion(logits, labels)
        loss.backward()
        s.optimizer.step()
        stats = RunningStats(float(loss.detach()) * len(labels), int((logits.argmax(1) == labels).sum()), len(labels))
        loop.step_end(1, 1, stats)
        return stats


class _Record(Callback):
    def __init__(self):
        self.events: list[str] = []

    def on_fit_start(self, loop):
        self.events.append("start")

    def on_step_end(self, loop, step, steps, running):
        self.events.append(f"step {loop.state.global_step}")

    def on_epoch_end(self, loop, end: EpochEnd):
        self.events.append(f"epoch {loop.state.epoch} {end.phase}")

    def on_fit_end(self, loop):
        self.events.append("end")


def test_a_new_phase_plugs_in_before_the_recipe_phases(data):
    setup = _setup(data)
    record = _Record()
    phases = [_HeadOnly(until=1), *recipe_phases(setup)[1:]]
    state = Loop(setup, phases, [record]).fit()
    assert state.epoch == 2 and state.global_step == 1 + setup.steps_per_epoch
    steps = [f"step {i}" for i in range(2, 2 + setup.steps_per_epoch)]
    assert record.events == ["start", "step 1", "epoch 1 head-only", *steps, "epoch 2 finetune", "end"]


class _Counting(_HeadOnly):
    """Counts its epochs, and keeps the count over a resume."""

    def __init__(self, until: int):
        super().__init__(until)
        self.trained = 0

    def train_epoch(self, loop: Loop, model: torch.nn.Module) -> RunningStats:
        self.trained += 1
        return super().train_epoch(loop, model)

    def state_dict(self) -> dict:
        return {"trained": self.trained}

    def load_state_dict(self, state: dict) -> None:
        self.trained = state.get("trained", 0)


def test_a_phase_keeps_its_state_in_the_checkpoint(data):
    loop = Loop(_setup(data), [_Counting(until=2)], [])
    loop.fit()
    checkpoint = loop.state_dict()
    assert checkpoint["phases"] == {"head-only": {"trained": 2}}
    resumed = _Counting(until=2)
    Loop(_setup(data), [resumed], []).load_state_dict(checkpoint)
    assert resumed.trained == 2


class _Workers(Callback):
    """The loader worker processes alive during the training steps."""

    def __init__(self):
        self.seen: dict[int, multiprocessing.Process] = {}

    def on_step_end(self, loop, step, steps, running):
        self.seen.update((p.pid, p) for p in multiprocessing.active_children())


def test_the_loop_stops_its_loader_workers_cleanly_as_it_ends(data):
    """Left to the garbage collector, the workers never got the stop message (their queues were finalized
    first) and were killed after 5 s each: 40 s at the end of every 8-worker GPU run."""
    setup = _setup(data, ("speed.workers=2",))
    workers = _Workers()
    Loop(setup, recipe_phases(setup), [workers]).fit()
    assert len(workers.seen) == 2
    assert [p.exitcode for p in workers.seen.values()] == [0, 0]  # exited by themselves, not killed


def test_an_epoch_that_waited_for_its_loader_says_so(data, tmp_path, monkeypatch, capsys):
    """Images that take 40 ms each to load (workers=0: in the main process) and a tiny model: most of each
    epoch is waiting, metrics.csv says how much and the log line names it."""
    from facecls.data.datasets import FaceImages

    slow_image = FaceImages.image

    def image(self, index):
        time.sleep(0.04)
        return slow_image(self, index)

    monkeypatch.setattr(FaceImages, "image", image)
    run = tmp_path / "slow"
    args = ["train", "--recipe", "mobilenet_v2", "--data", str(data), "--out", str(run), "--no-progress"]
    assert main([*args, *(a for item in TINY for a in ("--set", item))]) == 0
    with open(run / "metrics.csv", newline="", encoding="utf-8") as handle:
        waits = [float(r["data_wait_pct"]) for r in csv.DictReader(handle)]
    assert len(waits) == 2 and all(w >= 40.0 for w in waits), waits
    epochs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("% waiting for data)" in line for line in epochs), epochs

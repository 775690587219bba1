"""``facecls train``: a run folder, the built run, the loop with its callbacks, the final evaluation."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facecls.core import runs
from facecls.core.checkpoint import load_checkpoint
from facecls.core.console import Console
from facecls.core.errors import FaceclsError
from facecls.core.run_folder import RunFolder
from facecls.data.scan import find_labelled_images
from facecls.engine.builder import TrainingSetup, build_data, build_training, micro_batch_size
from facecls.engine.loop import Loop, recipe_phases, run_callbacks, schedule_over
from facecls.runtime.distributed import DistEnv, barrier, init_distributed
from facecls.runtime.machine import cpu_info
from facecls.runtime.speed import resolve_runtime, use_cpu_threads


@dataclass
class TrainResult:
    run: Path
    epochs: int
    best_val_acc: float
    final: dict


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global RNGs (the model's initialisation, dropout, augmentation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_info(setup: TrainingSetup, skipped_files: int) -> dict:
    """What run.json records about a run's set-up."""
    t, runtime, env = setup.recipe.train, setup.runtime, setup.env
    info = {
        "data_dir": str(setup.data_dir.resolve()),
        "model": setup.recipe.model.name,
        "recipe": setup.recipe.name,
        "num_classes": len(setup.class_names),
        "preprocess": setup.preprocess.as_dict(),
        "speed": runtime.as_dict(),
        "batch": {
            "global": t.batch_size,
            "per_process": setup.micro_batch,
            "grad_accum": t.grad_accum,
            "processes": env.world_size,
        },
        "seed": t.seed,
        "split_seed": setup.recipe.data.split_seed,
        "manifest_sha256": setup.data.manifest_sha256,
        "skipped_files": skipped_files,
        "environment": runs.environment(),
        "cpu": cpu_info(),
    }
    if setup.weights:
        info["weights"] = setup.weights
    return info


def final_evaluation(folder: RunFolder, setup: TrainingSetup, console: Console) -> dict:
    """The best checkpoint on the val and test splits; then the run is marked completed."""
    from facecls.commands.evaluate import evaluate_run

    results = {}
    for split in ("val", "test"):
        if split in setup.data.datasets:
            results[split] = evaluate_run(folder.path, split, env=setup.env, console=console, quiet=True)
    if setup.env.is_main:
        folder.mark_completed()
        text = ", ".join(f"{k} top-1 {100 * v['top1']:.2f}%" for k, v in results.items())
        best = load_checkpoint(folder.checkpoint("best")) if folder.checkpoint("best").is_file() else {}
        where = f" (epoch {best['epoch']}, {best.get('phase') or 'training'} phase)" if best else ""
        console.log(f"done: best checkpoint {folder.checkpoint('best')}{where}; {text}")
        console.log(
            f"errors, confusions and curves on one page: `facecls report {folder}` "
            f"(writes {folder.path / 'report.html'})"
        )
    return results


def train(
    recipe,
    data_dir: Path | None,
    run: Path,
    *,
    resume: bool = False,
    manifest: Path | None = None,
    offline: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``recipe`` on ``data_dir`` into ``run`` (or continue the run in ``run`` with resume). The main
    process holds the run folder's lock from its first look at the folder to the end."""
    env = init_distributed(device)
    console = Console(enabled=env.is_main, progress=progress)
    folder = RunFolder(run)
    if not resume:
        if data_dir is None:
            raise FaceclsError("--data DIR is required for a new run")
        find_labelled_images(Path(data_dir))  # a wrong --data fails before the run folder is created
    with _sigterm_exits_at_once(folder.path, env):
        try:
            resumed = None
            if resume:
                resumed = folder.resume(env.is_main)
                recipe, data_dir, manifest = resumed.recipe, resumed.data_dir, resumed.manifest
                trained = resumed.checkpoint is not None and schedule_over(recipe.train, resumed.checkpoint)
                console.log(resumed.describe(folder.path, trained))
            elif env.is_main:
                folder.create()
            return _train_in(folder, recipe, Path(data_dir), env, console, resumed, manifest, offline, device)
        finally:
            folder.release()
            # The loop stops its loader's workers as it ends (stop_workers); a run that failed before it
            # started still holds them. The loop and its callbacks refer to each other, so only the garbage
            # collector frees the run. Left to chance it may first run inside the next run's forked loader
            # worker, where the old loader's clean-up fails noisily ("can only test a child process", seen in
            # `facecls demo`); collected here, anything left stops in this process.
            gc.collect()


def _train_in(folder, recipe, data_dir, env, console, resumed, manifest, offline, device) -> TrainResult:
    barrier(env)
    runtime = resolve_runtime(recipe.speed, device, env.local_rank)
    use_cpu_threads(runtime)
    seed_everything(recipe.train.seed)
    micro_batch_size(recipe.train, env.world_size)  # a batch that does not divide fails before the data work
    data = build_data(recipe, data_dir, runtime, env, manifest=manifest)
    if resumed is not None:
        resumed.check(data.manifest_sha256, data.class_names, folder.path)
    skipped = data.skipped
    if env.is_main:
        folder.write_split(data.rows)
        skipped = folder.write_skipped(data.skipped, manifest)
    console.log(data.summary(skipped))
    checkpoint = resumed.checkpoint if resumed is not None else None
    setup = build_training(
        recipe,
        data_dir,
        runtime,
        env,
        data=data,
        load_weights=checkpoint is None and env.is_main,
        offline=offline,
        console=console,
    )
    loop = Loop(
        setup,
        recipe_phases(setup),
        run_callbacks(folder, setup),
        console,
        resume_hint=f"`facecls train --resume {folder}`",
    )
    if checkpoint is not None:
        loop.load_state_dict(checkpoint, str(folder.checkpoint("last")))
    if env.is_main:
        folder.write_setup(run_info(setup, len(skipped)), setup.class_names, recipe)
    state = loop.fit()
    final = final_evaluation(folder, setup, console)
    return TrainResult(folder.path, state.epoch, state.best_val_acc, final)


@contextlib.contextmanager
def _sigterm_exits_at_once(run: Path, env: DistEnv):
    """SIGTERM outside the training loop (data scan, decoding, final evaluation): nothing is worth
    finishing there, so the process ends at once, as a preempted job must, with the resume command on
    one line and exit code 143. Inside the loop the StopOnSignal callback takes over (it saves first).
    Files being written are left as temp files (removed by the resume), worker processes die with this
    one, and a half-built decoded cache is removed by the next run."""
    if env.enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum, frame) -> None:
        if (run / "config.yaml").is_file():
            what = f"continue with `facecls train --resume {run}`"
        else:
            what = "nothing was trained yet: run the same command again"
        os.write(2, f"facecls: stopped (SIGTERM) outside the training loop; {what}\n".encode())
        os._exit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

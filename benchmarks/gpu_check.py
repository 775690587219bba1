"""A short, self-contained check for a machine with a GPU (run it through ``benchmarks/gpu_check.sh``).

Each recipe is trained from random initialisation for 300 steps (10 epochs) at its own resolution on the
built-in synthetic faces (nothing is downloaded), once per speed setting (bf16 + channels_last, then
bf16 + channels_last + torch.compile, then fp32: every recipe in one setting before the next), exactly as
``facecls train`` runs it. It prints training img/s
(from the run's metrics.csv: the whole epoch, loading included), the share of it spent waiting for the
loader, and the peak memory (GPU memory from
nvidia-smi on a GPU, the process's peak RSS on a CPU). With two or more GPUs it also trains with
``--nproc 2`` (NCCL) and checks the run recorded two processes. A budget (default 7 minutes) stops it
from starting a configuration it could not finish. ``--tiny`` is the CPU smoke test of this script.

    bash benchmarks/gpu_check.sh                 # on the GPU machine
    bash benchmarks/gpu_check.sh --tiny          # anywhere: one small model, two short epochs
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from facecls.data.synthetic import SyntheticSpec, ensure_synthetic_faces

RECIPES = {"resnet50": 224, "mobilenet_v2": 224, "inception_resnet_v1": 160, "sface": 112}
# In the order they run, so that the budget cuts the least telling setting (fp32) first. On the H200
# (2026-12-04) one configuration took 1.5 minutes, 40 s of it a loader shutdown since fixed; the rest is
# start-up (torch's CUDA start alone 9 s), the first epoch and, with compile, compiling: 12 of them do not
# all fit in 8 minutes.
VARIANTS = {
    "bf16+cl": ["speed.precision=auto", "speed.channels_last=true"],
    "bf16+cl+compile": ["speed.precision=auto", "speed.channels_last=true", "speed.compile=true"],
    "fp32": ["speed.precision=fp32", "speed.channels_last=false"],
}


class GpuMemoryPoller:
    """Highest ``memory.used`` (MiB) that nvidia-smi reports while running; 0 without nvidia-smi."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
                self.peak_mb = max([self.peak_mb, *(float(v) for v in out.split() if v.strip())])
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuMemoryPoller:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)


class Trained(NamedTuple):
    """What one ``facecls train`` gave: the speed and the wait are medians over the epochs after the first
    (which pays for start-up and compiling)."""

    code: int
    img_per_s: float
    data_wait_pct: float
    peak_rss_mb: float
    peak_gpu_mb: float
    tail: str


def train_once(
    data: Path, run: Path, recipe: str, size: int, epochs: int, overrides: list[str], nproc: int = 1
) -> Trained:
    """One ``facecls train`` of ``recipe`` at ``size`` px on ``data`` into ``run``."""
    command = [sys.executable, "-m", "facecls", "train", "--recipe", recipe, "--data", str(data), "--out", str(run)]
    command += ["--no-progress"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    settings = [
        "model.weights=none",
        f"train.epochs={epochs}",
        "train.frozen_epochs=0",
        "train.unfreeze=all",
        "model.head.kind=linear",  # not sface's logistic probe: that one is fitted, not trained by steps
        f"data.input_size={size}",
        f"data.resize={size}",
        *overrides,
    ]
    for item in settings:
        command += ["--set", item]
    with GpuMemoryPoller() as gpu, tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-2000:]
    speed = wait = 0.0
    if proc.returncode == 0:
        with open(run / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        later = rows[1:] or rows
        speed = statistics.median(float(row["train_img_per_s"]) for row in later)
        wait = statistics.median(float(row["data_wait_pct"]) for row in later)
    return Trained(proc.returncode, speed, wait, usage.ru_maxrss / 1024, gpu.peak_mb, tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: mobilenet_v2 at 64 px, 2 epochs, 2 settings")
    p.add_argument("--epochs", type=int, default=10, help="epochs of 30 steps per configuration (default 10)")
    p.add_argument(
        "--budget",
        type=float,
        default=7.0,
        help="minutes (default 7, inside gpu_check.sh's 8); no configuration starts that would end later",
    )
    p.add_argument("--workdir", type=Path, help="keep data and runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    recipes, variants, epochs = RECIPES, VARIANTS, args.epochs
    if args.tiny:
        recipes, variants, epochs = {"mobilenet_v2": 64}, {k: VARIANTS[k] for k in ("bf16+cl", "fp32")}, 2
    started = time.monotonic()
    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0) if gpus else "CPU (no GPU visible)"
    print(f"gpu_check: {device}, {gpus} GPU(s), torch {torch.__version__}, {epochs} epochs per configuration")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="facecls-gpu-check-"))
    # 100 x 24 images: 1,920 to train, 30 steps of the recipes' batch 64 per epoch.
    spec = (
        SyntheticSpec(identities=4, images_per_identity=8, test_per_identity=1, size=64)
        if args.tiny
        else SyntheticSpec(identities=100, images_per_identity=24, test_per_identity=1, size=224)
    )
    data = ensure_synthetic_faces(work / "data", spec)
    nccl_failed = False  # checked first: the budget must not leave it out
    if gpus >= 2:
        run = work / "runs" / "nccl-2"
        trained = train_once(data, run, "resnet50", 224, 2, [], nproc=2)
        processes = json.loads((run / "run.json").read_text())["batch"]["processes"] if trained.code == 0 else 0
        ok = trained.code == 0 and processes == 2
        nccl_failed = not ok
        outcome = f"{'ok' if ok else 'FAILED'} ({trained.img_per_s:.1f} img/s)" + ("" if ok else f"\n{trained.tail}")
        print(f"NCCL, 2 processes: {outcome}")
    else:
        print("NCCL: skipped (fewer than 2 GPUs)")
    rows, failures, longest = [], 0, {}
    # "waiting for data": the share of an epoch the training loop waited for its loader. Where it is large,
    # the loader's workers, not the GPU, set the img/s.
    print("| recipe | px | setting | img/s | waiting for data | peak GPU MiB | peak RSS MiB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in variants.items():
        for recipe, size in recipes.items():
            # Started only if it should end inside the budget, judged by the longest run of its setting so far.
            begun = time.monotonic()
            if begun - started + longest.get(name, max(longest.values(), default=0.0)) > args.budget * 60:
                print(f"| {recipe} | {size} | {name} | (not run: the {args.budget:g}-minute budget) | | | | |")
                continue
            run = work / "runs" / f"{recipe}-{name}"
            shutil.rmtree(run, ignore_errors=True)
            trained = train_once(data, run, recipe, size, epochs, overrides)
            seconds = time.monotonic() - begun
            longest[name] = max(longest.get(name, 0.0), seconds)
            rows.append({"recipe": recipe, "size": size, "setting": name, "img_per_s": trained.img_per_s,
                         "exit": trained.code, "data_wait_pct": trained.data_wait_pct,
                         "peak_gpu_mb": trained.peak_gpu_mb, "peak_rss_mb": trained.peak_rss_mb,
                         "seconds": round(seconds, 1)})  # fmt: skip
            if trained.code:
                failures += 1
                failed = f"FAILED (exit {trained.code}) | | | | {seconds:.0f}"
                print(f"| {recipe} | {size} | {name} | {failed} |\n{trained.tail}")
            else:
                cells = (
                    f"{trained.img_per_s:.1f} | {trained.data_wait_pct:.0f}% | {trained.peak_gpu_mb:.0f} | "
                    f"{trained.peak_rss_mb:.0f} | {seconds:.0f}"
                )
                print(f"| {recipe} | {size} | {name} | {cells} |", flush=True)
    (work / "gpu_check.json").write_text(json.dumps({"device": device, "gpus": gpus, "rows": rows}, indent=2))
    print(f"results: {work / 'gpu_check.json'}  ({(time.monotonic() - started) / 60:.1f} min)")
    return 1 if failures or nccl_failed else 0


if __name__ == "__main__":
    sys.exit(main())

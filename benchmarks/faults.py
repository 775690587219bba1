"""Fault injection: kill a tiny training run with SIGKILL or SIGTERM at random moments, N times, resume
it each time, and check that it ends exactly like an uninterrupted run.

After every kill: every checkpoint on disk loads, and no process of the killed run is left (each run is
started in its own process group, as a scheduler starts a job step; SIGTERM goes to the whole group,
SIGKILL to the main process alone, so loader workers must die with it). At the end: the metrics (timing
columns aside), final evaluations and weights equal the uninterrupted run's, and neither the run folder
nor the decoded-image cache holds a temp file or folder. When a run finishes before N kills were made, a
fresh run continues the count.

    python benchmarks/faults.py --n 20 --data ../shared/data/orl     # for the record (RESULTS.md)
    (tests/reliability/test_faults.py runs it with --n 3 on the ORL faces shipped with the tests)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from facecls.core.runs import TIMING_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.weights=none",
    "data.input_size=16",
    "data.resize=18",
    "train.epochs=3",
    "train.frozen_epochs=1",
    "train.batch_size=4",
    "train.checkpoint_every=1",
    "speed.precision=fp32",
    "speed.workers=1",
    "optim.finetune_lr=0.0004",
    "scheduler.patience=0",
]


@dataclass
class Report:
    kills: list[dict] = field(default_factory=list)
    runs_completed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def make_data(orl: Path, dest: Path, identities: int = 4, images: int = 6) -> Path:
    """DEST/train/<identity>/ from an ORL-style folder (s1..sN holding 1.pgm..10.pgm)."""
    for i in range(1, identities + 1):
        folder = dest / "train" / f"s{i}"
        folder.mkdir(parents=True)
        for j in range(1, images + 1):
            shutil.copy(orl / f"s{i}" / f"{j}.pgm", folder / f"{j}.pgm")
    return dest


def _env(cache: Path) -> dict:
    return {
        **os.environ,
        "FACECLS_JEMALLOC": "0",
        "FACECLS_OFFLINE": "1",
        "FACECLS_CACHE": str(cache),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def _one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _start(args: list[str], cache: Path, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "facecls", *map(str, args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(cache),
        preexec_fn=_one_core,
        start_new_session=True,
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(pgid: int, limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _new_run_args(data: Path, run: Path) -> list[str]:
    args = ["train", "--recipe", "mobilenet_v2", "--data", data, "--out", run, "--no-progress"]
    for item in TINY:
        args += ["--set", item]
    return args


def _run_args(data: Path, run: Path) -> list[str]:
    if (run / "config.yaml").exists():
        return ["train", "--resume", run, "--no-progress"]
    return _new_run_args(data, run)  # killed before its set-up was written: start it again


def _completed(run: Path) -> bool:
    try:
        return bool(json.loads((run / "run.json").read_text()).get("completed"))
    except (OSError, ValueError):
        return False


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(handle)]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def compare_runs(run: Path, base: Path) -> list[str]:
    """Differences between a resumed run and the uninterrupted one (empty: equal)."""
    problems = []
    got, want = _metrics(run), _metrics(base)
    if [r["epoch"] for r in got] != [r["epoch"] for r in want]:
        problems.append(f"{run}: metrics epochs {[r['epoch'] for r in got]} != {[r['epoch'] for r in want]}")
    else:
        for a, b in zip(got, want, strict=True):
            for key, value in b.items():
                same = a[key] == value if key == "phase" else abs(float(a[key]) - float(value)) <= 1e-6
                if not same:
                    problems.append(f"{run}: epoch {b['epoch']} {key} {a[key]} != {value}")
    for split in ("val", "test"):
        a = json.loads((run / f"eval_{split}.json").read_text())
        b = json.loads((base / f"eval_{split}.json").read_text())
        for key in ("count", "top1", "top5", "epoch"):
            if a[key] != b[key]:
                problems.append(f"{run}: eval_{split} {key} {a[key]} != {b[key]}")
        if abs(a["loss"] - b["loss"]) > 1e-6 * max(1.0, abs(b["loss"])):
            problems.append(f"{run}: eval_{split} loss {a['loss']} != {b['loss']}")
    resumed, uninterrupted = _load(run / "last.ckpt"), _load(base / "last.ckpt")
    # fp32 on one thread, same kernels, same order: the weights are bit-identical; 1e-6 leaves room
    # only for a reduction order that changes between processes
    diff = max(float((resumed["model"][k].float() - v.float()).abs().max()) for k, v in uninterrupted["model"].items())
    if diff > 1e-6:
        problems.append(f"{run}: weights differ by {diff}")
    return problems


def run_faults(data: Path, workdir: Path, n: int, seed: int, log=print) -> Report:
    """Baseline run, then N kills (SIGKILL or SIGTERM, at a random moment) with resumes; see module doc."""
    rng = random.Random(seed)
    cache = workdir / "cache"
    report = Report()
    base = workdir / "base"
    with tempfile.TemporaryFile("w+") as out:
        started = time.monotonic()
        proc = _start(_new_run_args(data, base), cache, out)
        code = proc.wait()
        duration = time.monotonic() - started
        out.seek(0)
        if code != 0:
            report.problems.append(f"baseline failed ({code}): {out.read()[-2000:]}")
            return report
    log(f"baseline: {duration:.1f} s")
    run_index, run = 0, workdir / "run0"
    while len(report.kills) < n:
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        delay = rng.uniform(0.2, duration)
        with tempfile.TemporaryFile("w+") as out:
            proc = _start(_run_args(data, run), cache, out)
            try:
                code = proc.wait(timeout=delay)
                fired = False
            except subprocess.TimeoutExpired:
                if sig == signal.SIGTERM:
                    os.killpg(proc.pid, sig)  # as a scheduler does: every process of the job
                else:
                    proc.send_signal(sig)  # the main process alone: its workers must follow it
                fired = True
                code = proc.wait(timeout=600)
            out.seek(0)
            text = out.read()
        if not _wait_group_gone(proc.pid):
            report.problems.append(f"kill {len(report.kills) + 1}: processes of the killed run are left")
            os.killpg(proc.pid, signal.SIGKILL)
        if "Traceback" in text:
            report.problems.append(f"{run}: a traceback after {signal.Signals(sig).name}: {text[-2000:]}")
        if fired:
            # SIGTERM: 143 once `train` runs (its one line says how to resume); -15 while Python still
            # imports, before the command has started; 0 when the run ended first
            expected = {-9} if sig == signal.SIGKILL else {143, -15, 0}
            if code not in expected:
                report.problems.append(f"{run}: exit {code} after {signal.Signals(sig).name}: {text[-1500:]}")
            said = [line for line in text.splitlines() if line.startswith("facecls:")]
            if code == 143 and (len(said) != 1 or not ("--resume" in said[0] or "again" in said[0])):
                report.problems.append(f"{run}: after SIGTERM, not one line saying how to go on: {said}")
            states = []
            for ckpt in sorted(run.glob("*.ckpt")):
                try:
                    state = _load(ckpt)
                    states.append(f"{ckpt.name}@{state['epoch']}.{state['step_in_epoch']}")
                except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
                    report.problems.append(f"{ckpt} unreadable after {signal.Signals(sig).name}: {exc}")
            report.kills.append({"signal": signal.Signals(sig).name, "after_s": round(delay, 2), "exit": code})
            log(f"kill {len(report.kills)}: {signal.Signals(sig).name} after {delay:.1f} s -> exit {code}; {states}")
        elif code != 0:
            report.problems.append(f"{run}: exit {code} without a kill: {text[-1500:]}")
            break
        if _completed(run):
            report.problems += _finish_and_compare(run, base, data, cache)
            report.runs_completed += 1
            run_index += 1
            run = workdir / f"run{run_index}"
    if (run / "config.yaml").exists() or run.exists():  # the last run: resume it to the end, unkilled
        with tempfile.TemporaryFile("w+") as out:
            code = _start(_run_args(data, run), cache, out).wait()
            out.seek(0)
            if code != 0:
                report.problems.append(f"{run}: final resume exit {code}: {out.read()[-2000:]}")
        if code == 0:
            report.problems += _finish_and_compare(run, base, data, cache)
            report.runs_completed += 1
    leftovers = [p for p in cache.rglob("*") if ".tmp" in p.name]
    if leftovers:
        report.problems.append(f"temp files or folders left in the cache: {leftovers[:5]}")
    return report


def _finish_and_compare(run: Path, base: Path, data: Path, cache: Path) -> list[str]:
    problems = compare_runs(run, base)
    temps = list(run.glob(".*.tmp"))
    if temps:
        problems.append(f"{run}: temp files left: {temps}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="number of kills")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "orl", help="ORL folder")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        data = make_data(args.data, workdir / "data")
        started = time.monotonic()
        report = run_faults(data, workdir, args.n, seed)
        minutes = (time.monotonic() - started) / 60
    signals = [k["signal"] for k in report.kills]
    print(
        f"seed {seed}: {len(report.kills)} kills ({signals.count('SIGKILL')} SIGKILL, {signals.count('SIGTERM')} "
        f"SIGTERM), {report.runs_completed} runs completed, {minutes:.1f} min: "
        + (
            "all equal to the uninterrupted run, no unreadable checkpoint, no process or temp file left"
            if report.ok
            else f"{len(report.problems)} problems"
        )
    )
    for problem in report.problems:
        print("  " + problem)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

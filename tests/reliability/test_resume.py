"""Checkpoints and resume: a run killed at random points (SIGKILL, also during a checkpoint save,
after a metrics row, during the final evaluation; SIGINT) and resumed each time ends exactly like an
uninterrupted run, and no checkpoint on disk is ever unreadable. A full disk keeps the old checkpoint."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from facecls.core import checkpoint as checkpoint_module
from facecls.core import runs
from facecls.core.checkpoint import load_checkpoint, save_checkpoint
from facecls.core.errors import FaceclsError
from facecls.core.runs import TIMING_COLUMNS

from .conftest import assert_one_line_error, copy_identities, pin_to_one_core, tiny_args


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


def _rows(run: Path) -> int:
    return len(_metrics(run)) if (run / "metrics.csv").exists() else 0


def _final_eval(run: Path) -> dict:
    return {split: json.loads((run / f"eval_{split}.json").read_text()) for split in ("val", "test")}


def _check_checkpoints_readable(run: Path) -> list[dict]:
    states = []
    for path in sorted(run.glob("*.ckpt")):
        states.append(load_checkpoint(path))  # raises on a torn or unreadable file
    return states


class Child:
    """``python -m facecls ...`` in a child process, stopped by a signal when ``trigger()`` says so."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "FACECLS_JEMALLOC": "0"}
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8")  # a pipe nobody reads could fill up
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "facecls", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=pin_to_one_core,
        )

    def run(self, trigger=None, sig=None, timeout: float = 120) -> tuple[int, bool, str]:
        started, fired = time.monotonic(), False
        while self.proc.poll() is None:
            if sig is not None and not fired and trigger():
                self.proc.send_signal(sig)
                fired = True
                if sig == signal.SIGKILL:
                    break
            if time.monotonic() - started > timeout:
                self.proc.kill()
                pytest.fail("training child did not finish in time")
            time.sleep(0.002)
        self.proc.wait(timeout=60)
        self.log.seek(0)
        out = self.log.read()
        self.log.close()
        return self.proc.returncode, fired, out


def _train_new(data: Path, run: Path) -> list[str]:
    # One DataLoader worker process on purpose: its RNG must not leak into the results either. A lr that
    # changes when the backbone is unfrozen and a plateau schedule that halves it on every flat epoch:
    # optimizer and scheduler state must come back exactly too.
    extra = (
        "train.epochs=3",
        "train.checkpoint_every=1",
        "speed.workers=1",
        "optim.finetune_lr=0.0004",
        "scheduler.patience=0",
    )
    return ["train", "--data", str(data), "--out", str(run), *tiny_args(*extra)]


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# Triggers: each factory is called right before its child starts and returns "signal it now?".


def during_save(run: Path):
    """A checkpoint temp file exists: the kill lands inside save_checkpoint (torch.save, fsync, rename).
    Should polling miss three saves in a row (a very fast disk), it fires right after the third."""
    last, state = run / "last.ckpt", {"mtime": _mtime(run / "last.ckpt"), "seen": 0}

    def trigger() -> bool:
        if any(run.glob(".*.ckpt.*.tmp")):
            return True
        if _mtime(last) != state["mtime"]:
            state["mtime"], state["seen"] = _mtime(last), state["seen"] + 1
        return state["seen"] >= 3

    return trigger


def after_saves(run: Path, rng: random.Random, most: int = 3):
    """After 1..most rewrites of last.ckpt plus a random delay: anywhere in a step, a save, an evaluation."""
    last, target, delay = run / "last.ckpt", rng.randint(1, most), rng.uniform(0.0, 0.5)
    state = {"mtime": _mtime(last), "seen": 0, "at": None}

    def trigger() -> bool:
        now = _mtime(last)
        if now != state["mtime"]:
            state["mtime"], state["seen"] = now, state["seen"] + 1
            if state["seen"] == target:
                state["at"] = time.monotonic() + delay
        return state["at"] is not None and time.monotonic() >= state["at"]

    return trigger


def after_metrics_row(run: Path):
    """A metrics row was appended: the epoch's last.ckpt is not written yet (resume must drop the row)."""
    start = _size(run / "metrics.csv")
    return lambda: _size(run / "metrics.csv") > start


def during_final_evaluation(run: Path):
    return lambda: (run / "eval_val.json").exists()


def test_killed_and_resumed_run_equals_uninterrupted_run(faces_data, tmp_path):
    data = copy_identities(faces_data, tmp_path / "data", identities=4, images=6)  # 16 train: 4 steps/epoch
    (data / "train" / "s1" / ".DS_Store").write_bytes(b"\0")  # skipped_files.csv must survive resumes
    base, run = tmp_path / "base", tmp_path / "killed"
    code, _, out = Child(_train_new(data, base)).run()
    assert code == 0, out

    seed = random.randrange(1 << 30)
    print(f"kill-point seed {seed}")
    rng = random.Random(seed)
    plan = [
        (lambda: during_save(run), signal.SIGKILL),
        (lambda: after_saves(run, rng), signal.SIGKILL),
        (lambda: after_metrics_row(run), signal.SIGKILL),
        (lambda: during_save(run), signal.SIGKILL),
        (lambda: after_saves(run, rng, most=1), signal.SIGINT),  # Ctrl-C: stop at the next step boundary
        (lambda: after_saves(run, rng), signal.SIGKILL),
        (lambda: during_final_evaluation(run), signal.SIGKILL),
        (lambda: None, None),
    ]
    interrupted = 0
    for make_trigger, sig in plan:
        started = (run / "config.yaml").exists()  # else it was killed before its set-up: start it again
        if started and runs.read_run_info(run).get("completed"):
            code = 0  # the last kill landed after the run had recorded its completion: nothing left to do
            break
        args = ["train", "--resume", str(run), "--no-progress"] if started else _train_new(data, run)
        code, fired, out = Child(args).run(make_trigger(), sig)
        assert "Traceback" not in out, out
        if code == 0:
            break
        assert fired, out
        if sig == signal.SIGINT:
            assert code == 130 or (code == 2 and "stopped at the end of" in out and "--resume" in out), out
        interrupted += 1
        states = _check_checkpoints_readable(run)
        where = [(s["epoch"], s["step_in_epoch"]) for s in states]
        print(f"signal {sig!r} -> exit {code}; checkpoints at (epoch, step) {where}; metrics rows {_rows(run)}")
    assert code == 0, out
    assert interrupted >= 4, "most interruptions should land before the run finishes"

    assert not list(run.glob(".*.tmp")), "temp files of killed saves are cleaned up on resume"
    resumed_rows, base_rows = _metrics(run), _metrics(base)  # timing columns aside
    assert [r["epoch"] for r in resumed_rows] == [r["epoch"] for r in base_rows]  # no row twice, none missing
    for resumed_row, base_row in zip(resumed_rows, base_rows, strict=True):
        assert resumed_row.keys() == base_row.keys()
        for key, value in base_row.items():
            if key == "phase":
                assert resumed_row[key] == value
            else:
                # The same computation (same process, threads, batches and restored state): the numbers
                # agree to the digits metrics.csv prints, so the tolerance is only its rounding.
                assert float(resumed_row[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-6), key
    assert (run / "skipped_files.csv").read_text() == (base / "skipped_files.csv").read_text()
    assert "train/s1/.DS_Store" in (run / "skipped_files.csv").read_text()
    final, expected = _final_eval(run), _final_eval(base)
    for split in ("val", "test"):
        for key in ("count", "top1", "top5", "epoch"):
            assert final[split][key] == expected[split][key]
        assert final[split]["loss"] == pytest.approx(expected[split]["loss"], rel=1e-6, abs=1e-7)
    resumed, uninterrupted = load_checkpoint(run / "last.ckpt"), load_checkpoint(base / "last.ckpt")
    assert resumed["global_step"] == uninterrupted["global_step"]
    diff = max(float((resumed["model"][k].float() - v.float()).abs().max()) for k, v in uninterrupted["model"].items())
    assert diff <= 1e-6, diff
    assert runs.read_run_info(run)["completed"] is True


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "class_names": ["a"], "epoch": 1}, path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(FaceclsError) as info:
        save_checkpoint({"model": {"w": torch.zeros(3)}, "class_names": ["a"], "epoch": 2}, path)
    message = str(info.value)
    assert "disk full" in message and str(path) in message and "\n" not in message
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_disk_full_during_training_is_one_line(faces_data, tmp_path, monkeypatch, run_cli, one_core):
    data = copy_identities(faces_data, tmp_path / "data", identities=3, images=6)  # 3 steps/epoch
    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_then_fill_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_fill_disk)
    result = run_cli("train", "--data", data, "--out", run, *tiny_args("train.checkpoint_every=1", "speed.workers=0"))
    line = assert_one_line_error_after_logs(result)
    assert "disk full" in line and str(run / "last.ckpt") in line and "intact" in line
    assert load_checkpoint(run / "last.ckpt")["step_in_epoch"] == 1  # the first save, untouched
    assert not list(run.glob(".*.tmp"))


def assert_one_line_error_after_logs(result) -> str:
    """Training may log progress before failing; the failure itself is one line, no traceback."""
    errors = [line for line in result.error_lines if line.startswith("facecls: error:")]
    assert result.code == 2 and "Traceback" not in result.err and len(errors) == 1, result.err
    return errors[0]


def test_truncate_metrics_drops_later_and_torn_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    for epoch in (1, 2, 3):
        runs.append_metrics(path, {"epoch": epoch, "train_loss": 1.0 / epoch})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("4,")  # a row a killed process left half written
    runs.truncate_metrics(path, 2)
    assert [row["epoch"] for row in runs.read_metrics(path)] == ["1", "2"]
    runs.truncate_metrics(path, 0)
    assert not path.exists()


def test_metrics_keep_one_header_when_a_resumed_run_adds_a_column(tmp_path):
    """A run begun by a facecls without a column (resumed after an upgrade): the file is rewritten with
    the union of the columns, the older rows' new cells empty, instead of a row longer than its header."""
    path = tmp_path / "metrics.csv"
    runs.append_metrics(path, {"epoch": 1, "train_loss": 0.5})
    runs.append_metrics(path, {"epoch": 2, "train_loss": 0.25, "data_wait_pct": 12.5})
    runs.append_metrics(path, {"epoch": 3, "train_loss": 0.125, "data_wait_pct": 3.0})
    assert path.read_text().splitlines()[0] == "epoch,train_loss,data_wait_pct"
    assert runs.read_metrics(path) == [
        {"epoch": "1", "train_loss": "0.5", "data_wait_pct": ""},
        {"epoch": "2", "train_loss": "0.25", "data_wait_pct": "12.5"},
        {"epoch": "3", "train_loss": "0.125", "data_wait_pct": "3.0"},
    ]


def test_one_line_helper_is_strict():  # the helper used across this folder must reject tracebacks
    from .conftest import CliResult

    with pytest.raises(AssertionError):
        assert_one_line_error(CliResult(2, "", "Traceback (most recent call last):\nfacecls: error: x\n"))


def test_disk_full_outside_checkpoints_is_one_line(faces_data, tmp_path, monkeypatch, run_cli, one_core):
    data = copy_identities(faces_data, tmp_path / "data", identities=3, images=6)

    def full_disk(path, row):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "append_metrics", full_disk)
    result = run_cli("train", "--data", data, "--out", tmp_path / "run", *tiny_args("speed.workers=0"))
    line = assert_one_line_error_after_logs(result)
    assert "disk full" in line and "--resume" in line

"""Fault injection (benchmarks/faults.py) at CI size: a tiny run killed 3 times at random moments with
SIGKILL or SIGTERM, resumed each time, ends exactly like an uninterrupted run; no checkpoint is ever
unreadable and no process or temp file is left. The record run (N=20) is in benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _faults_module():
    spec = importlib.util.spec_from_file_location("facecls_faults", ROOT / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_three_random_kills_end_like_an_uninterrupted_run(faces_data, tmp_path):
    faults = _faults_module()
    data = faults.make_data(faces_data / "orl", tmp_path / "data")
    seed = random.randrange(1 << 30)
    print(f"fault seed {seed}")
    report = faults.run_faults(data, tmp_path, n=3, seed=seed)
    assert report.ok, "\n".join(report.problems)
    assert len(report.kills) == 3 and report.runs_completed >= 1

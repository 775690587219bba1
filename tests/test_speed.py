"""Speed settings resolved from the recipe and the machine."""

import os

import pytest

from facecls.config import SpeedConfig
from facecls.speed import resolve_runtime


def test_cpu_threads_and_workers_never_oversubscribe(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    runtime = resolve_runtime(SpeedConfig(), "cpu")
    assert runtime.threads >= 1
    assert runtime.threads + runtime.workers <= max(cores, 1 + runtime.workers)


def test_speed_threads_and_workers_come_from_the_recipe():
    runtime = resolve_runtime(SpeedConfig(threads=3, workers=0), "cpu")
    assert (runtime.threads, runtime.workers) == (3, 0)
    assert runtime.as_dict()["threads"] == 3  # recorded in run.json
    with pytest.raises(ValueError, match="speed.threads"):
        SpeedConfig(threads=0)

"""What this process may use of the machine, without importing torch (the CLI launcher and ``prepare``
ask before torch is loaded, if it ever is)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (containers, taskset), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

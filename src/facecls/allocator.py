"""jemalloc for facecls processes: it must be preloaded at process start, so the process re-executes itself.

Measured on the 2-core CPU machines: glibc malloc spent 25-30% of the time in page faults while training,
and preloading jemalloc made training 1.1-3.6x faster. Kept free of torch imports: it runs before them.
"""

from __future__ import annotations

import os
import sys

JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def jemalloc_loaded() -> bool:
    return "jemalloc" in os.environ.get("LD_PRELOAD", "")


def jemalloc_environment() -> dict[str, str] | None:
    """The environment to re-execute with (jemalloc preloaded, OMP_WAIT_POLICY=passive unless set), or None
    when that is not wanted (FACECLS_JEMALLOC=0), already done, not Linux, or jemalloc is not installed.

    OpenMP threads that sleep instead of spinning keep their speed when a loader worker or another process
    takes a core (see speed.resolve_runtime)."""
    if os.environ.get("FACECLS_JEMALLOC", "1") == "0" or jemalloc_loaded() or not sys.platform.startswith("linux"):
        return None
    lib = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
    if lib is None:
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}".strip() if env.get("LD_PRELOAD") else lib
    env.setdefault("MALLOC_CONF", "background_thread:true,metadata_thp:auto,dirty_decay_ms:30000")
    env.setdefault("OMP_WAIT_POLICY", "passive")
    return env


def reexec_with_jemalloc(argv: list[str]) -> None:
    """Replace this process with ``sys.executable *argv`` under jemalloc; returns if that is not wanted or
    the exec fails (the command then runs as it is)."""
    env = jemalloc_environment()
    if env is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError:
        return

"""The allocator keeps freed memory: a large buffer freed and allocated again costs no page faults."""

import json
import os
import subprocess
import sys

import pytest

from facecls.runtime.allocator import JEMALLOC_PATHS, WORKER_DECAY_MS, jemalloc_environment

# Allocates a 64 MiB buffer, frees it, allocates and fills one of the same size again, and prints the
# minor page faults of the second allocation (16,384 when the pages come fresh from the kernel).
PROBE = """
import json, resource, sys
from facecls.runtime.allocator import keep_freed_memory_glibc, keep_freed_memory_jemalloc
keep = {"mallopt": keep_freed_memory_glibc, "mallctl": keep_freed_memory_jemalloc}.get(sys.argv[1])
applied = keep() if keep else None
size = 64 << 20
first = b"\\x01" * size
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = b"\\x02" * size
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(mode: str, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return json.loads(done.stdout)


def _plain_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "FACECLS_JEMALLOC")}
    return env


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibc_keeps_freed_memory_after_mallopt():
    plain = _probe("none", _plain_env())
    kept = _probe("mallopt", _plain_env())
    assert kept["applied"] is True
    assert plain["faults"] > 10_000  # the control: glibc hands the block back and faults it in again
    assert kept["faults"] < 1_000


def test_facecls_jemalloc_0_leaves_the_allocator_alone():
    env = {**_plain_env(), "FACECLS_JEMALLOC": "0"}
    assert _probe("mallopt", env)["applied"] is False


@pytest.mark.skipif(not any(os.path.exists(p) for p in JEMALLOC_PATHS), reason="jemalloc is not installed")
def test_jemalloc_environment_keeps_freed_memory(monkeypatch):
    for name in ("LD_PRELOAD", "MALLOC_CONF", "FACECLS_JEMALLOC"):
        monkeypatch.delenv(name, raising=False)
    env = jemalloc_environment()
    assert env is not None and "jemalloc" in env["LD_PRELOAD"]
    assert _probe("none", env)["faults"] < 1_000
    # the control: jemalloc with its default decay faults the pages in again
    assert _probe("none", {**env, "MALLOC_CONF": "background_thread:true"})["faults"] > 10_000


@pytest.mark.skipif(not any(os.path.exists(p) for p in JEMALLOC_PATHS), reason="jemalloc is not installed")
@pytest.mark.parametrize("conf", [None, "background_thread:true"])
def test_jemalloc_preloaded_by_the_user_is_told_to_keep_freed_memory(monkeypatch, conf):
    """LD_PRELOAD=libjemalloc set by the user: facecls does not re-exec, so it sets never-purge in place."""
    for name in ("LD_PRELOAD", "MALLOC_CONF", "FACECLS_JEMALLOC"):
        monkeypatch.delenv(name, raising=False)
    env = {**jemalloc_environment(), **({"MALLOC_CONF": conf} if conf else {})}
    if conf is None:
        del env["MALLOC_CONF"]
    assert _probe("none", env)["faults"] > 10_000  # the control: jemalloc's default decay
    kept = _probe("mallctl", env)
    assert kept["applied"] is True
    assert kept["faults"] < 1_000


@pytest.mark.skipif(not any(os.path.exists(p) for p in JEMALLOC_PATHS), reason="jemalloc is not installed")
def test_a_decay_the_user_set_for_jemalloc_stays(monkeypatch):
    for name in ("LD_PRELOAD", "MALLOC_CONF", "FACECLS_JEMALLOC"):
        monkeypatch.delenv(name, raising=False)
    env = {**jemalloc_environment(), "MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}
    probe = _probe("mallctl", env)
    assert probe["applied"] is False
    assert probe["faults"] > 10_000


# Reads jemalloc's decay settings in this process and in a forked child (a DataLoader worker is one).
FORK_PROBE = """
import json, os
from facecls.runtime.allocator import jemalloc_dirty_decay_ms as decay
read, write = os.pipe()
if os.fork() == 0:
    os.write(write, str(decay()).encode())
    os._exit(0)
os.wait()
print(json.dumps({"parent": decay(), "child": int(os.read(read, 64))}))
"""


def test_forked_loader_workers_purge_what_they_free(monkeypatch):
    """Never-purge is for the training process; a loader worker under it grew ~27 KB per image served."""
    for name in ("LD_PRELOAD", "MALLOC_CONF", "FACECLS_JEMALLOC"):
        monkeypatch.delenv(name, raising=False)
    env = jemalloc_environment()
    if env is None:
        pytest.skip("jemalloc is not installed (Debian: libjemalloc2)")
    done = subprocess.run([sys.executable, "-c", FORK_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"parent": -1, "child": WORKER_DECAY_MS}


# What the facecls command's start-up leaves in place when it does not re-execute (the argv it would
# re-execute with exits 3 at once).
START_PROBE = """
import json, os, sys
from facecls.runtime.allocator import jemalloc_dirty_decay_ms, reexec_with_jemalloc
reexec_with_jemalloc(["-c", "raise SystemExit(3)"])
print(json.dumps({"decay": jemalloc_dirty_decay_ms(), "omp": os.environ.get("OMP_WAIT_POLICY")}))
"""


@pytest.mark.skipif(not any(os.path.exists(p) for p in JEMALLOC_PATHS), reason="jemalloc is not installed")
def test_start_up_under_a_users_jemalloc_keeps_memory_and_sleeps_openmp_threads_in_place(monkeypatch):
    for name in ("LD_PRELOAD", "MALLOC_CONF", "FACECLS_JEMALLOC", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    env = {k: v for k, v in jemalloc_environment().items() if k not in ("MALLOC_CONF", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", START_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr  # 3 would mean it re-executed
    assert json.loads(done.stdout) == {"decay": -1, "omp": "passive"}
    env["OMP_WAIT_POLICY"] = "active"  # the user's choice stays
    done = subprocess.run([sys.executable, "-c", START_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["omp"] == "active"

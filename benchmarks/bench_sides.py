"""The benchmark's sides as long-lived processes, each in the process environment its user would have.

The naive loop runs as a plain PyTorch user runs it: the system allocator and OpenMP defaults. facecls
runs as the ``facecls`` command runs: its allocator settings (facecls.runtime.allocator) and sleeping OpenMP
threads. The naive loop under facecls's allocator is a third side, so the table can say how much of the
gain is the allocator alone. An allocator must be chosen at process start, so each side is a process;
the parent sends one command per block ("train", "predict", "data") and reads one JSON line back, and
alternates the sides block by block, so that the load of other processes hits every side alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from facecls.runtime.allocator import jemalloc_dirty_decay_ms

NAIVE, NAIVE_ALLOC, FACECLS = "naive", "naive-alloc", "facecls"
SIDES = (NAIVE, NAIVE_ALLOC, FACECLS)
_FACECLS_ENV = ("MALLOC_CONF", "OMP_WAIT_POLICY")


def side_environment(kind: str, facecls_allocator: bool = True) -> dict[str, str]:
    """The environment a side process starts with. For ``naive``: the caller's environment without
    anything facecls adds (a preloaded jemalloc, MALLOC_CONF, OMP_WAIT_POLICY) and with
    FACECLS_JEMALLOC=0. For the others: the caller's; the process itself then sets its allocator up the
    way the ``facecls`` command does (FACECLS_JEMALLOC=0 when ``facecls_allocator`` is off)."""
    env = dict(os.environ)
    if kind == NAIVE:
        preload = [p for p in env.get("LD_PRELOAD", "").split() if "jemalloc" not in p]
        env["LD_PRELOAD"] = " ".join(preload)
        if not preload:
            del env["LD_PRELOAD"]
        for name in _FACECLS_ENV:
            env.pop(name, None)
        env["FACECLS_JEMALLOC"] = "0"
    elif not facecls_allocator:
        env["FACECLS_JEMALLOC"] = "0"
    return env


class SideProcess:
    """One side, started with ``command`` + ``--_side KIND`` in its environment; ``call`` runs a block."""

    def __init__(self, kind: str, command: list[str], facecls_allocator: bool = True):
        self.kind = kind
        self.proc = subprocess.Popen(
            [*command, "--_side", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=side_environment(kind, facecls_allocator),
        )
        self.meta = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} side exited (rc {self.proc.wait()}); its error is above")
        return json.loads(line)

    def call(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def block(self, command: str) -> tuple[int, float]:
        reply = self.call(command)
        return reply["images"], reply["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (BrokenPipeError, RuntimeError):
                pass
        self.proc.wait(timeout=60)


def serve(blocks: dict[str, Callable[[], int]], meta: Callable[[], dict]) -> None:
    """The side process's loop: one JSON line per command read from stdin."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else the side prints must not reach the protocol
    allocator = {"ld_preload": os.environ.get("LD_PRELOAD", ""), "malloc_conf": os.environ.get("MALLOC_CONF", "")}
    allocator["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    allocator["jemalloc_dirty_decay_ms"] = jemalloc_dirty_decay_ms()  # in effect, whatever set it

    def send(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    send({"ready": True, "environment": allocator})
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            send({"bye": True})
            return
        if command == "meta":
            send(meta())
            continue
        started = time.perf_counter()
        images = blocks[command]()
        send({"images": images, "seconds": time.perf_counter() - started})


def interleaved(sides: dict[str, SideProcess], command: str, rounds: int) -> dict:
    """A warm-up block per side, then ``rounds`` rounds of one block per side, the order rotating each
    round. img/s per side over the timed rounds; ratios of facecls to each naive side (overall and per
    round)."""
    names = list(sides)
    for name in names:
        sides[name].block(command)
    totals = {name: [0, 0.0] for name in names}
    per_round = []
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        this = {}
        for name in order:
            images, seconds = sides[name].block(command)
            totals[name][0] += images
            totals[name][1] += seconds
            this[name] = images / seconds
        per_round.append(this)
    out: dict = {name: images / seconds for name, (images, seconds) in totals.items()}
    for naive in (NAIVE, NAIVE_ALLOC):
        if naive in out:
            suffix = "" if naive == NAIVE else "_alloc"
            out[f"ratio{suffix}"] = out[FACECLS] / out[naive]
            out[f"ratio{suffix}_per_round"] = [r[FACECLS] / r[naive] for r in per_round]
    return out

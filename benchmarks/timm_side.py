"""The throughput benchmark's timm side: timm's own ``train.py``, run as a timm user runs it, on the same images.

timm stays outside the project: its ``train.py`` (a checkout of pytorch-image-models) runs as a subprocess
in its own Python environment, on the benchmark's ImageFolder layout (``DATA/train/<identity>/``), with the
same model (timm's name for it), batch, number of classes and resolution, random initialisation, and
timm's best CPU flags: bf16 autocast (``--amp --amp-dtype bfloat16``) where the CPU computes bf16 in hardware
(AMX or AVX512-BF16; elsewhere bf16 is emulated and many times slower, so timm runs in fp32 there, as
facecls does), ``--channels-last``, and with ``--torchcompile`` as a second variant (the faster one
counts). Validation is off (``--val-split ''``) and checkpoints are written only after the last epoch, so
neither is in the timed steps.

Speed is read off timm's own log (``--log-interval 1``: one line per optimizer step with its time and
rate): the first epoch is the warm-up (it pays compilation and the loader's start), the epochs after it
are the timed rounds, each one pass over the images as on the other sides; img/s = images / seconds over
their steps. timm's step time runs from the end of one step to the end of the next, so it includes the
wait for data, as the other sides' epoch times do. (timm drops the last incomplete batch of an epoch.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from facecls.runtime.allocator import JEMALLOC_CONF, JEMALLOC_PATHS
from facecls.runtime.speed import cpu_supports_bf16

# timm's names for the benchmark's models. InceptionResNetV1 and SFace have no timm model (timm's
# inception_resnet_v2 is a different, 3x larger network), so those rows have no timm side.
TIMM_MODELS = {"resnet50": "resnet50", "mobilenet_v2": "mobilenetv2_100"}
BF16_FLAGS = ("--amp", "--amp-dtype", "bfloat16")
LAYOUT_FLAGS = ("--channels-last",)
COMPILE_FLAG = "--torchcompile"
VARIANTS = {"off": ("eager",), "on": ("compiled",), "both": ("eager", "compiled")}
# One line per logged optimizer step, e.g.
# "Train: 1 [   2/3 (100%)]  Loss: 3.84 (2.20)  Time: 0.266s,   30.10/s  (0.262s,   30.58/s)  LR: ..."
_STEP_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+)\s.*?Time: ([\d.]+)s,\s*([\d.]+)/s")


@dataclass(frozen=True)
class TimmSide:
    """Where timm is and how to run it."""

    train_py: Path
    python: str
    workers: int = 1
    compile: str = "both"
    """"off", "on" or "both" (both variants are run and the faster one counts)."""
    jemalloc: bool = True
    """Run timm under the allocator settings the facecls side gets (jemalloc, never purging)."""
    extra: tuple[str, ...] = field(default=())
    """More train.py arguments, e.g. --opt-kwargs fused=True."""

    def environment(self) -> dict[str, str]:
        """The caller's environment without facecls's settings, timm's checkout on PYTHONPATH (so the
        recorded commit is the code that runs), and jemalloc preloaded when asked and installed."""
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "OMP_WAIT_POLICY")}
        env.pop("FACECLS_JEMALLOC", None)
        root = str(self.train_py.resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        library = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
        if self.jemalloc and library:
            env.update(LD_PRELOAD=library, MALLOC_CONF=JEMALLOC_CONF, OMP_WAIT_POLICY="passive")
        return env


def find_timm(train_py: Path | None, python: str | None, search_root: Path, **options) -> tuple[TimmSide | None, str]:
    """The timm side to run, or None and why not. Without ``train_py``, ``search_root/timm/train.py``
    (a checkout beside the project's); without ``python``, ``search_root/timmenv/bin/python`` when it
    exists, else this interpreter."""
    if train_py is None:
        train_py = search_root / "timm" / "train.py"
        if not train_py.is_file():
            return None, "not run (no --timm-train, and no ../timm/train.py)"
    elif not train_py.is_file():
        return None, f"not run ({train_py} not found)"
    if python is None:
        beside = search_root / "timmenv" / "bin" / "python"
        python = str(beside) if beside.exists() else sys.executable
    return TimmSide(train_py, python, **options), ""


def timm_version(side: TimmSide) -> dict:
    """timm's and torch's versions in timm's environment, and the git commit of timm's checkout."""
    probe = "import json, timm, torch; print(json.dumps({'timm': timm.__version__, 'torch': torch.__version__}))"
    done = subprocess.run(
        [side.python, "-c", probe], capture_output=True, text=True, env=side.environment(), check=False
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"timm is not importable by {side.python}: {lines[-1] if lines else done.returncode}")
    version = json.loads(done.stdout.strip().splitlines()[-1])
    git = subprocess.run(
        ["git", "-C", str(side.train_py.resolve().parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    version["commit"] = git.stdout.strip() if git.returncode == 0 else "unknown (not a git checkout)"
    return version


def timm_flags() -> tuple[str, ...]:
    """timm's best precision and layout flags on this CPU (bf16 only where facecls's ``auto`` picks it too)."""
    return (*BF16_FLAGS, *LAYOUT_FLAGS) if cpu_supports_bf16() else LAYOUT_FLAGS


def timm_command(
    side: TimmSide,
    model: str,
    data: Path,
    size: int,
    batch_size: int,
    classes: int,
    epochs: int,
    optimizer: str,
    output: Path,
    compiled: bool,
) -> list[str]:
    """timm's train.py command line for one run of ``model`` (timm's name) on ``data/train``."""
    return [
        side.python,
        str(side.train_py),
        "--data-dir", str(data),
        "--train-split", "train",
        "--val-split", "",  # no validation: nothing but training steps to time
        "--model", model,
        "--num-classes", str(classes),
        "--input-size", "3", str(size), str(size),
        "--batch-size", str(batch_size),
        "--epochs", str(epochs),
        "--val-interval", str(epochs),  # the only checkpoint is written after the last epoch
        "--checkpoint-hist", "1",
        "--opt", optimizer,
        "--workers", str(side.workers),
        "--device", "cpu",
        "--log-interval", "1",
        "--seed", "0",
        "--output", str(output),
        *timm_flags(),
        *([COMPILE_FLAG] if compiled else []),
        *side.extra,
    ]  # fmt: skip


def parse_train_log(text: str, batch_size: int, warmup_epochs: int = 1) -> dict:
    """Steady-state training speed from timm's log: img/s over every step of the epochs after the first
    ``warmup_epochs``, and per epoch. A step's seconds are batch / its logged rate (the rate has more
    significant digits than the logged time)."""
    per_epoch: dict[int, list[float]] = {}
    for match in _STEP_LINE.finditer(text):
        epoch, rate = int(match.group(1)), float(match.group(5))
        if rate > 0:
            per_epoch.setdefault(epoch, []).append(batch_size / rate)
    timed = {epoch: seconds for epoch, seconds in per_epoch.items() if epoch >= warmup_epochs}
    if not timed:
        raise ValueError(
            f"timm logged no training steps after its {warmup_epochs} warm-up epoch(s) "
            f"({sum(map(len, per_epoch.values()))} steps in all): too few images for one batch of {batch_size}?"
        )
    steps = sum(len(seconds) for seconds in timed.values())
    seconds = sum(sum(s) for s in timed.values())
    return {
        "img_s": steps * batch_size / seconds,
        "steps": steps,
        "seconds": seconds,
        "img_s_per_epoch": [len(s) * batch_size / sum(s) for _, s in sorted(timed.items())],
        "warmup_s": sum(sum(s) for epoch, s in per_epoch.items() if epoch < warmup_epochs),
    }


def run_timm(
    side: TimmSide,
    name: str,
    data: Path,
    size: int,
    batch_size: int,
    classes: int,
    rounds: int,
    optimizer: str,
    workdir: Path,
) -> dict:
    """timm's training speed for the benchmark's model ``name``: {"status": "n/a"} when timm has no such
    model; else each variant's result (or its error) and the best under "img_s"."""
    model = TIMM_MODELS.get(name)
    if model is None:
        return {"status": "n/a", "why": f"timm has no {name}"}
    result: dict = {"status": "ok", "timm_model": model, "variants": {}}
    for variant in VARIANTS[side.compile]:
        workdir.mkdir(parents=True, exist_ok=True)
        output = Path(tempfile.mkdtemp(prefix=f"timm-{name}-{size}-{variant}-", dir=workdir))
        command = timm_command(
            side, model, data, size, batch_size, classes, 1 + rounds, optimizer, output, variant == "compiled"
        )
        done = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=side.environment(), check=False
        )
        (output / "train.log").write_text(done.stdout)
        entry: dict = {"command": command[1:], "log": str(output / "train.log")}
        try:
            if done.returncode != 0:
                raise ValueError(f"train.py exited with {done.returncode}: {_last_line(done.stdout)}")
            entry.update(parse_train_log(done.stdout, batch_size))
        except ValueError as exc:
            entry["error"] = str(exc)
        result["variants"][variant] = entry
    speeds = {v: e["img_s"] for v, e in result["variants"].items() if "img_s" in e}
    if not speeds:
        result["status"] = "failed"
        return result
    result["variant"] = max(speeds, key=speeds.get)
    result["img_s"] = speeds[result["variant"]]
    return result


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"

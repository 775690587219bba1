"""Where a training step's time goes: torch.profiler's CPU time by operator, per model at its resolution.

Each model's run is built as `facecls train` builds it (engine/builder.build_training, through the
throughput benchmark's facecls side: the recipe as a plain fine-tuning run from random weights, every layer
trainable), in the process environment the ``facecls`` command sets up (its allocator, sleeping OpenMP
threads) and with the runtime's own choices (bf16 autocast where the CPU computes bf16, channels_last,
threads, loader workers). After ``--warmup`` steps, ``--steps`` steps are timed without the profiler and
then ``--steps`` more run under it, each set after one step that is not counted (a new pass over the
loader waits for its first batch); the tables give milliseconds per step: the top operators by self CPU
time, and the step split into convolution
(oneDNN forward and backward), linear layers, BatchNorm / activations / other elementwise ops, dtype and
memory-format copies, the optimizer (step and zero_grad), compiled (inductor) kernels, other operators, and
time outside any operator
(Python, waiting for the loader). The profiler adds to each operator call, so a step of many small
operators is slower under it: MobileNetV2's fp32 step at 112 px took 1,133 ms profiled against about 830
ms in training (benchmarks/RESULTS.md, session 12). Compare settings by the unprofiled time in each
table's heading, and read the shares as where the time goes, not as what a step costs.

    python benchmarks/profile_step.py --out profile.md
    python benchmarks/profile_step.py --models sface@112 mobilenet_v2@112 --steps 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_MODELS = ("resnet50@224", "mobilenet_v2@224", "mobilenet_v2@112", "inception_resnet_v1@160", "sface@112")
TOP_OPS = 12
CATEGORIES = (
    "convolution (oneDNN forward + backward)",
    "linear layers (matmul)",
    "BatchNorm / activations / elementwise",
    "dtype and memory-format copies",
    "optimizer (step + zero_grad)",
    "next batch from the loader",
    "compiled (inductor) kernels",
    "other operators, autograd engine",
    "outside operators (Python)",
)
_MATMUL = {"addmm", "mm", "bmm", "matmul", "linear", "addmm_activation"}
_ELEMENTWISE = (
    "batch_norm",
    "prelu",
    "relu",
    "threshold",
    "hardtanh",
    "silu",
    "sigmoid",
    "dropout",
    "bernoulli",
    "add",
    "sub",
    "mul",
    "div",
    "clamp",
    "where",
    "neg",
    "fill_",
    "zero_",
)
_COPIES = {"copy_", "to_copy", "to", "clone", "contiguous", "copy_from", "copy_from_and_resize"}


def category(name: str, in_optimizer: bool) -> str:
    """The share an event's self time counts in (``in_optimizer``: it ran inside Optimizer.step/zero_grad).
    Only aten operators are sorted by kind; the autograd engine's and autograd Functions' own time is "other"."""
    if in_optimizer:
        return CATEGORIES[4]
    if name.startswith("enumerate(DataLoader)"):
        return CATEGORIES[5]
    if "CompiledFxGraph" in name:  # speed.compile's graphs, or the compiled PReLU (runtime.cpu_kernels)
        return CATEGORIES[6]
    if not name.startswith("aten::"):
        return CATEGORIES[7]
    op = name.removeprefix("aten::").lstrip("_").removeprefix("native_")
    if "conv" in op:
        return CATEGORIES[0]
    if op in _MATMUL:
        return CATEGORIES[1]
    if op in _COPIES:
        return CATEGORIES[3]
    if op.startswith(_ELEMENTWISE):
        return CATEGORIES[2]
    return CATEGORIES[7]


def summarize(events, steps: int) -> dict:
    """Per-step self CPU time by operator and by category from the profiler's events: only what ran inside
    a profiled step (under a ``ProfilerStep`` range), whose own self time is the time outside operators."""
    ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    shares: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    step_us = 0.0
    for event in events:
        chain, parent = [], event
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if not chain[-1].startswith("ProfilerStep"):
            continue
        if event.name.startswith("ProfilerStep"):
            step_us += event.cpu_time_total
            shares[CATEGORIES[8]] += event.self_cpu_time_total
            continue
        ops[event.name][0] += event.self_cpu_time_total
        ops[event.name][1] += 1
        shares[category(event.name, any(n.startswith("Optimizer.") for n in chain))] += event.self_cpu_time_total
    return {
        "step_ms": step_us / 1000 / steps,
        "ops": {name: (us / 1000 / steps, calls / steps) for name, (us, calls) in ops.items()},
        "shares": {name: us / 1000 / steps for name, us in shares.items()},
    }


def markdown(name: str, size: int, batch_size: int, runtime: dict, summary: dict, steps: int, plain_ms: float) -> str:
    step = summary["step_ms"]
    work_arounds = [f"{k} {v}" for k, v in runtime.items() if type(v) is bool and k not in ("channels_last", "compile")]
    lines = [
        f"### {name} @ {size} px, batch {batch_size}: {plain_ms:.0f} ms per step ({1000 * batch_size / plain_ms:.1f} "
        f"img/s; {step:.0f} ms under the profiler; {steps} step(s) each)",
        "",
        "runtime: " + ", ".join(f"{k} {runtime[k]}" for k in ("precision", "channels_last", "compile", "threads")),
        f"workers {runtime['workers']}, " + ", ".join(work_arounds),
        "",
        "| operator | self CPU ms per step | % of step | calls per step |",
        "|---|---|---|---|",
    ]
    top = sorted(summary["ops"].items(), key=lambda item: item[1][0], reverse=True)[:TOP_OPS]
    for op, (ms, calls) in top:
        lines.append(f"| `{op}` | {ms:.1f} | {100 * ms / step:.1f}% | {calls:g} |")
    lines += ["", "| share of the step | ms per step | % of step |", "|---|---|---|"]
    for share, ms in summary["shares"].items():
        lines.append(f"| {share} | {ms:.1f} | {100 * ms / step:.1f}% |")
    return "\n".join(lines)


def profile_model(args, name: str, size: int, work: Path) -> str:
    """Build ``name`` at ``size`` px as `facecls train` would, warm it up, profile ``args.steps`` steps."""
    import torch
    from throughput import Facecls, make_jpeg_data

    # Enough images that every step fits in one epoch (no loader restart inside): the warm-up, the unprofiled
    # steps and the profiled ones, each after a first step that is not counted.
    per_identity = -(-(args.warmup + 2 * args.steps + 2) * args.batch_size // args.identities)
    data = make_jpeg_data(args.faces, work, size, args.identities, per_identity)
    runner = Facecls(name, data, size, args.batch_size, work / "cache", args.set)

    def run_steps(count: int, after_step=None) -> None:
        done = 0
        while done < count:
            images = runner.train_epoch(max_steps=count - done, after_step=after_step)
            done += -(-images // args.batch_size)

    started = time.perf_counter()
    run_steps(args.warmup)
    # Timed from the end of an untimed first step, as the profiler's schedule below leaves its first step
    # out: a new pass over the loader waits for its first batch, which is not a step's cost.
    ends: list[float] = []
    run_steps(1 + args.steps, after_step=lambda step, stats: ends.append(time.perf_counter()))
    plain_ms = 1000 * (ends[-1] - ends[0]) / args.steps
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=args.steps, repeat=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule) as prof:
        run_steps(1 + args.steps, after_step=lambda step, stats: prof.step())
    steps = args.warmup + 2 * args.steps + 2
    print(f"{name} @ {size}: {steps} steps in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    summary = summarize(prof.events(), args.steps)
    return markdown(name, size, args.batch_size, runner.runtime.as_dict(), summary, args.steps, plain_ms)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from throughput import CELEB24, parse_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        metavar="MODEL@PX",
        help=f"models at their resolutions (default: {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--steps", type=int, default=1, help="profiled steps, averaged (default 1)")
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled ones (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default: the recipes' 64)")
    p.add_argument(
        "--faces", type=Path, default=CELEB24, help="DIR/<identity>/<image> (default: ../shared/data/celeb24)"
    )
    p.add_argument("--identities", type=int, default=24)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. speed.compile=true"
    )
    p.add_argument("--workdir", type=Path, help="keep the JPEGs and the decoded cache here (default: a temp dir)")
    p.add_argument("--out", type=Path, metavar="FILE.md", help="also write the tables here")
    args = p.parse_args(argv)
    try:
        args.configs = [parse_config(text) for text in args.models]
    except ValueError as exc:
        p.error(str(exc))
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2:
        p.error("--steps must be >= 1, --warmup >= 0 and --batch-size >= 2 (BatchNorm)")
    return args


def main() -> int:
    from facecls.runtime.allocator import reexec_with_jemalloc

    reexec_with_jemalloc(sys.argv)  # as the facecls command does: jemalloc, or glibc told to keep memory
    args = parse_args()
    import torch
    from throughput import lscpu_summary

    work = Path(args.workdir or tempfile.mkdtemp(prefix="facecls-profile-"))
    header = [
        f"## One training step by operator (`benchmarks/profile_step.py`), {time.strftime('%Y-%m-%d')}",
        "",
        f"torch {torch.__version__}; {lscpu_summary()}; batch {args.batch_size}; {args.warmup} warm-up step(s)"
        + (f"; overrides: {' '.join(args.set)}" if args.set else ""),
    ]
    print("\n".join(header), flush=True)
    tables = []
    for name, size in args.configs:
        tables.append(profile_model(args, name, size, work))
        print("\n" + tables[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header) + "\n\n" + "\n\n".join(tables) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

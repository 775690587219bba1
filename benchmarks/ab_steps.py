"""Two settings of one in-process switch, timed step against step in the same process.

Separate processes differ by up to 15% on these shared machines (benchmarks/RESULTS.md, session 9), more
than many of the choices measured here, so this builds one training run of the throughput benchmark's
facecls side and alternates blocks of steps with a switch of `facecls.runtime` on and off: same memory, same
convolution plans, same data. The switch is the module attribute ``--switch`` names, which the runtime reads
at every step (for example ``facecls.runtime.fused_bn:ENABLED``), or ``compile``: the step through
``torch.compile`` of the model (on) against the model itself (off), the two sharing parameters and optimizer;
compiled, facecls's eager CPU kernels step aside (they check ``torch.compiler.is_compiling()``), as with
``speed.compile: true``.

    python benchmarks/ab_steps.py --model sface@112 --switch facecls.runtime.fused_bn:ENABLED
    python benchmarks/ab_steps.py --model resnet50@112 --switch facecls.runtime.cpu_kernels:BITS_RELU
    python benchmarks/ab_steps.py --model resnet50@224 --switch compile
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from throughput import CELEB24, parse_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=parse_config, required=True, help="NAME@PX, e.g. sface@112")
    p.add_argument(
        "--switch", required=True, help="MODULE:ATTRIBUTE, a boolean the runtime reads every step; or compile"
    )
    p.add_argument("--rounds", type=int, default=4, help="rounds of one block per setting (default 4)")
    p.add_argument("--steps", type=int, default=3, help="steps per block (default 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--identities", type=int, default=24)
    p.add_argument("--faces", type=Path, default=CELEB24, help="face images to make the data set from")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    return p.parse_args(argv)


def main() -> int:
    from facecls.runtime.allocator import reexec_with_jemalloc

    reexec_with_jemalloc(sys.argv)  # as the facecls command does
    args = parse_args()
    from throughput import Facecls, lscpu_summary, make_jpeg_data

    if args.switch != "compile":
        module_name, _, attribute = args.switch.partition(":")
        module = importlib.import_module(module_name)
        if not isinstance(getattr(module, attribute, None), bool):
            raise SystemExit(f"--switch {args.switch}: {module_name} has no boolean {attribute!r}")
    name, size = args.model
    steps = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        per_identity = -(-(2 * args.rounds + 1) * steps * args.batch_size // args.identities) + 1
        data = make_jpeg_data(args.faces, work, size, args.identities, per_identity)
        runner = Facecls(name, data, size, args.batch_size, work / "cache", args.set)
        times: dict[bool, list[float]] = {True: [], False: []}
        if args.switch == "compile":
            import torch

            models = {False: runner.model, True: torch.compile(runner.model)}

            def switch(setting: bool) -> None:
                runner.step_model = models[setting]
        else:

            def switch(setting: bool) -> None:
                setattr(module, attribute, setting)

        for setting in (True, False):  # warm-up: compilation, plans, first-touch memory
            switch(setting)
            runner.train_epoch(max_steps=steps)
        for r in range(args.rounds):
            for setting in (True, False) if r % 2 == 0 else (False, True):
                switch(setting)
                started = time.perf_counter()
                images = runner.train_epoch(max_steps=steps)
                times[setting].append(1000 * (time.perf_counter() - started) / -(-images // args.batch_size))
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(lscpu_summary())
    print(f"{name} @ {size} px, batch {args.batch_size}, {args.set or 'recipe defaults'}: {args.switch}")
    print(f"  on  ms per step {on:.0f} (blocks: {', '.join(f'{t:.0f}' for t in times[True])})")
    print(f"  off ms per step {off:.0f} (blocks: {', '.join(f'{t:.0f}' for t in times[False])})")
    print(f"  on / off speed x{off / on:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

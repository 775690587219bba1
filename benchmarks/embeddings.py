"""Embeddings first: classifiers on frozen SFace embeddings against facecls's trained heads, on real faces.

On one or more splits of an aligned face set (celeb24 by default: 24 identities, 112 px aligned crops),
each with and without flip test-time augmentation, top-1 accuracy on the validation and test images and
the CPU seconds (this process and its children, user + system) each method took:

  (a) scikit-learn LogisticRegression on the frozen, L2-normalised embeddings (the reference), and the
      same with flip TTA (image and mirror embedded)
  (b) facecls's `sface` default: a logistic-regression head on stored features (2 views, flip TTA), and
      the same with 1 view and no TTA (the same forward passes as (a)); (b') the linear head trained by
      AdamW epochs with early stopping (the default before)
  (c) nearest class mean (recipe sface_ncm)        (d) kNN (recipe sface_knn)
  (e) head on stored features then a short fine-tune, logistic and arcface heads (first split only)

Per split, all facecls runs use the same split (the first run's split.csv) and one feature cache, fresh
for the benchmark, so the first (b) run pays for computing its stored features (train, val and test) and
(c)/(d) reuse them (their seconds are the classifier's alone). With several ``--split-seeds`` a summary
adds up the test errors over the splits. Needs scikit-learn: pip install "facecls[bench]".

    python benchmarks/embeddings.py [--data ../shared/data/celeb24] [--finetune-epochs 1] [--split-seeds 42 1 2]
                                    [--degrade 16]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from facecls.runtime.allocator import reexec_with_jemalloc
from facecls.runtime.machine import cpu_text

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timer:
    def __enter__(self):
        self.cpu, self.wall = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = cpu_seconds() - self.cpu, time.perf_counter() - self.wall


def cell(row: dict, key: str) -> str:
    return f"{100 * row[key]:.2f}" if key in row else "-"


def run_name(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method).strip("_")[:60]


def facecls_run(name: str, recipe: str, overrides: list[str], data: Path, out: Path, manifest: Path | None) -> dict:
    from facecls.commands.evaluate import evaluate_run
    from facecls.commands.train import train
    from facecls.config import load_recipe

    run = out / run_name(name)
    with Timer() as timer:
        train(load_recipe(recipe, overrides), data, run, manifest=manifest, progress=False)
    own = json.loads((run / "eval_test.json").read_text())["top1"]  # the run's own setting (flip TTA or not)
    result = {"method": name, "cpu_s": round(timer.cpu, 1), "wall_s": round(timer.wall, 1), "test_own": own}
    for tta in (False, True):
        for split in ("val", "test"):
            result[f"{split}{'_tta' if tta else ''}"] = evaluate_run(run, split, quiet=True, tta=tta)["top1"]
    return result


def split_paths(run: Path, data: Path) -> dict[str, tuple[list[Path], list[str]]]:
    with open(run / "split.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {
        split: (
            [data / r["path"] for r in rows if r["split"] == split],
            [r["identity"] for r in rows if r["split"] == split],
        )
        for split in ("train", "val", "test")
    }


def sklearn_reference(paths: dict) -> list[dict]:
    """(a): LogisticRegression on unit embeddings (train: the image; TTA: image + mirror at test time)."""
    from sklearn.linear_model import LogisticRegression

    from facecls.engine.embeddings import compute_embeddings, load_embedder

    results = []
    for tta in (False, True):
        with Timer() as timer:  # loading the model counts, as it does for facecls's runs
            embedder = load_embedder("sface", "opencv-zoo-int8bq", offline=True)
            vectors = {s: compute_embeddings(embedder, p, flip=tta).numpy() for s, (p, _) in paths.items()}
            classifier = LogisticRegression(max_iter=2000, C=10.0)
            classifier.fit(vectors["train"], paths["train"][1])
            scores = {
                s: float(np.mean(classifier.predict(vectors[s]) == np.array(paths[s][1]))) for s in ("val", "test")
            }
        suffix = "_tta" if tta else ""
        results.append(
            {
                "method": f"(a) sklearn LogisticRegression{' + flip TTA' if tta else ''}",
                "cpu_s": round(timer.cpu, 1),
                "wall_s": round(timer.wall, 1),
                f"val{suffix}": scores["val"],
                f"test{suffix}": scores["test"],
                "test_own": scores["test"],
            }
        )
    return results


def degrade(src: Path, dst: Path, pixels: int) -> None:
    """A harder copy of ``src`` (<identity>/<image>): greyscale, down to ``pixels`` and back up to its size.
    On celeb24 as it is every method is within a test image or two of 100%; this separates them."""
    from PIL import Image

    for path in sorted(src.glob("*/*")):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".pgm"):
            continue
        (dst / path.parent.name).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            grey = image.convert("L").convert("RGB")
            small = grey.resize((pixels, pixels), Image.Resampling.BILINEAR)
            small.resize(grey.size, Image.Resampling.BILINEAR).save(dst / path.parent.name / (path.stem + ".png"))


def one_split(work: Path, data: Path, split_seed: int, finetune_epochs: int) -> list[dict]:
    """Every method on the split ``data.split_seed=split_seed`` of ``data``."""
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    seed = [f"data.split_seed={split_seed}"]
    first = "(b) `sface` default: logistic head on stored features (2 views, flip TTA)"
    rows.append(facecls_run(first, "sface", seed, data, work, None))
    print(rows[-1], flush=True)
    manifest = work / run_name(first) / "split.csv"
    for name, recipe, extra in (
        ("(b) the same, 1 view, no TTA", "sface", ["train.feature_views=1", "model.flip_tta=false"]),
        ("(b') linear head by AdamW epochs, early stopping", "sface", ["model.head.kind=linear"]),
        ("(c) nearest mean", "sface_ncm", []),
        ("(d) kNN k=10", "sface_knn", []),
    ):
        rows.append(facecls_run(name, recipe, seed + extra, data, work, manifest))
        print(rows[-1], flush=True)
    paths = split_paths(work / run_name(first), data)
    for row in sklearn_reference(paths):
        rows.append(row)
        print(row, flush=True)
    if finetune_epochs > 0:
        total = f"train.epochs={1 + finetune_epochs}"
        for name, extra in (
            ("(e) probe + fine-tune, logistic", []),
            ("(e) probe + fine-tune, arcface", ["model.head.kind=arcface"]),
        ):
            over = [*seed, total, "train.frozen_epochs=1", "train.unfreeze=all", *extra]
            rows.append(facecls_run(f"{name} ({finetune_epochs} epoch)", "sface", over, data, work, manifest))
            print(rows[-1], flush=True)
    count = len(paths["test"][0])
    return [{**r, "split_seed": split_seed, "test_count": count} for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data/celeb24"),
        help="aligned faces as <identity>/<image> (default: ../shared/data/celeb24)",
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=1, help="(e), on the first split only: fine-tuning epochs (0: skip (e))"
    )
    parser.add_argument(
        "--degrade",
        type=int,
        metavar="PX",
        help="a harder set: every image greyscale, shrunk to PX pixels and enlarged back (e.g. 16)",
    )
    parser.add_argument(
        "--split-seeds",
        type=int,
        nargs="+",
        default=[42],
        help="one split per seed (data.split_seed; 42 is facecls's default); more splits, more test images",
    )
    parser.add_argument("--out", type=Path, help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    # The environment the `facecls` command gives itself (jemalloc, sleeping OpenMP threads, hence a
    # thread per core): without it every run here would compute on one thread.
    reexec_with_jemalloc([str(Path(__file__).resolve()), *sys.argv[1:]])
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print('this benchmark needs scikit-learn: pip install "facecls[bench]"', file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"no face folder at {args.data}: pass --data DIR (<identity>/<image>)", file=sys.stderr)
        return 2
    work = Path(args.out or tempfile.mkdtemp(prefix="facecls-embeddings-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FACECLS_CACHE"] = str(work / "cache")  # fresh: (b) pays for its stored features
    data = work / "data"
    if not data.exists():
        data.mkdir()
        if args.degrade:
            degrade(args.data, data / "train", args.degrade)
        else:
            (data / "train").symlink_to(args.data.resolve(), target_is_directory=True)
    print(
        f"{args.data}: CPU {cpu_text()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}; work folder {work}",
        flush=True,
    )

    rows: list[dict] = []
    for split_seed in args.split_seeds:
        rows += one_split(work / f"split{split_seed}", data, split_seed, args.finetune_epochs if not rows else 0)
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    print(
        "\n| split seed | method | val | test | val (flip TTA) | test (flip TTA) | CPU s | wall s |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['split_seed']} | {r['method']} | {cell(r, 'val')} | {cell(r, 'test')} | {cell(r, 'val_tta')} | "
            f"{cell(r, 'test_tta')} | {r['cpu_s']} | {r['wall_s']} |"
        )
    if len(args.split_seeds) > 1:
        print(f"\nOver the {len(args.split_seeds)} splits (test errors, each method with or without TTA as it runs):\n")
        print("| method | test errors | test images | test top-1 | mean CPU s |\n|---|---|---|---|---|")
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            errors = sum(round((1 - r["test_own"]) * r["test_count"]) for r in mine)
            images = sum(r["test_count"] for r in mine)
            cpu = sum(r["cpu_s"] for r in mine) / len(mine)
            print(f"| {method} | {errors} | {images} | {100 * (1 - errors / images):.2f} | {cpu:.1f} |")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

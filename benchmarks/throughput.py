"""Training, prediction and data-pipeline throughput: facecls's own path vs the seed notebook's naive loop.

Three sides, each a long-lived process in the environment its user would have (bench_sides.py): the
naive loop as a plain PyTorch user runs it (system allocator, OpenMP defaults), the same naive loop
under facecls's allocator settings (to show what the allocator alone gives), and facecls as the
``facecls`` command runs it. An allocator can only be chosen at process start, hence processes; the
blocks are interleaved (one block per side, the order rotating every round) after a warm-up block for
each side, so that the load of other processes on the machine hits every side alike. A block is one pass
over the benchmark's images (one epoch, or one prediction pass), so each side's loader starts and drains
inside its own block: the facecls workers never work ahead while another side is timed. Peak memory is
measured in a fresh subprocess per configuration and side.

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --configs resnet50@224 inception_resnet_v1@160 sface@112 --rounds 3
    python benchmarks/throughput.py --models resnet50 mobilenet_v2 --sizes 224 112

By default every model runs at 224, 160 and 112 px, and ``sface`` (fine-tuned whole) at its 112 px.

``--no-jemalloc`` runs the facecls side without its allocator settings (FACECLS_JEMALLOC=0);
``--no-naive-alloc`` leaves out the third side.

A fourth side, timm's ``train.py`` (timm_side.py), trains the same images, model and batch in timm's own
environment after the other sides of each configuration, with and without ``--torchcompile``:

    python benchmarks/throughput.py --timm-train ../timm/train.py --timm-python ../timmenv/bin/python

Without ``--timm-train`` it runs when ``../timm/train.py`` exists beside the checkout; its column says
"not run" otherwise, and "n/a" for the models timm does not have (InceptionResNetV1, SFace). timm's own
environment, beside the checkout (the same torch as facecls's, timm from its source, no other timm
dependency changed):

    git clone https://github.com/huggingface/pytorch-image-models ../timm
    python3 -m venv ../timmenv
    ../timmenv/bin/pip install torch torchvision pyyaml huggingface_hub safetensors
    ../timmenv/bin/pip install --no-deps -e ../timm
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision import models as tvm
from torchvision import transforms as T

from facecls.commands.predict import predict_batches
from facecls.commands.train import seed_everything
from facecls.config import load_recipe
from facecls.data.datasets import ImageFiles
from facecls.data.scan import list_flat_images
from facecls.engine.builder import build_data, build_training, set_phase
from facecls.engine.inference import inference_model, predict_loader
from facecls.engine.steps import RunningStats, StepContext, train_one_epoch
from facecls.runtime.allocator import reexec_with_jemalloc
from facecls.runtime.speed import CompiledInference, cpu_supports_bf16, resolve_runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sides import FACECLS, NAIVE, NAIVE_ALLOC, SideProcess, interleaved, serve, side_environment  # noqa: E402
from timm_side import (  # noqa: E402
    BF16_FLAGS,
    LAYOUT_FLAGS,
    TIMM_MODELS,
    VARIANTS,
    find_timm,
    run_timm,
    timm_flags,
    timm_version,
)

CHECKOUT = Path(__file__).resolve().parents[1]
CELEB24 = CHECKOUT.parent / "shared" / "data" / "celeb24"
MODELS = ("resnet50", "mobilenet_v2", "inception_resnet_v1", "sface")
SIZES = (224, 160, 112)
# SFace's embedding layer is a Linear over its 7 x 7 x 1024 feature map: it takes 112 px faces only.
FIXED_SIZE = {"sface": 112}
# The resolutions that matter: the torchvision recipes' 224 px, InceptionResNetV1's native 160 px, and
# 112 px, the aligned face crops' size (SFace's only one).
DEFAULT_CONFIGS = tuple((name, size) for size in SIZES for name in MODELS if FIXED_SIZE.get(name, size) == size)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_THREADS = torch.get_num_threads()
PREDICT_BATCH = 128  # `facecls predict --batch-size` default
TRAIN_TARGET = 3.0  # the speed target: facecls training at >= 3x the naive loop
KAGGLE_TEST_IMAGES = 35_000  # the seed's Kaggle test folder: the job `facecls predict` makes its choices for


# ---- environment -------------------------------------------------------------------------------
def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's RSS high-water mark (VmHWM) in MiB."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _achieved_flops(step, flops_per_call: float, seconds: float) -> float:
    """FLOP/s of ``step()`` run for ``seconds`` after 3 warm-up calls, on all of torch's threads."""
    torch.set_num_threads(DEFAULT_THREADS)
    with torch.no_grad():
        for _ in range(3):
            step()
        iters, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            step()
            iters += 1
    return flops_per_call * iters / (time.perf_counter() - started)


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of a big square torch.mm."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return _achieved_flops(lambda: torch.mm(a, b), 2 * n**3, seconds)


def conv_peak(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of a 3x3 convolution, 256 -> 256 channels at 28 px, batch 32, channels_last: the
    oneDNN kernel the models spend most of their time in. This is the peak the percentages use: torch.mm
    in fp32 goes to MKL, which on AMD CPUs runs at well under half of what oneDNN's fp32 convolutions
    reach (measured 200 vs 510 GFLOP/s), so a matmul peak overstates fp32."""
    x = torch.randn(32, 256, 28, 28).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    return _achieved_flops(lambda: nn.functional.conv2d(x, w, padding=1), 2 * 32 * 28 * 28 * 256 * 256 * 9, seconds)


# ---- data --------------------------------------------------------------------------------------
def make_jpeg_data(faces: Path, dst: Path, size: int, identities: int, per_identity: int) -> Path:
    """Face images from ``faces/<identity>/`` resized to ``size`` and saved as JPEG (q90): train/<identity>/
    and a flat test/."""
    root = dst / f"jpeg{size}"
    if (root / "done").exists():
        return root
    if not faces.is_dir():
        raise SystemExit(f"face folders not found at {faces}: pass --faces DIR (DIR/<identity>/<image>)")
    people = sorted(p for p in faces.iterdir() if p.is_dir())[:identities]
    (root / "test").mkdir(parents=True, exist_ok=True)
    for person in people:
        (root / "train" / person.name).mkdir(parents=True, exist_ok=True)
        for file in sorted(person.iterdir())[:per_identity]:
            img = Image.open(file).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            img.save(root / "train" / person.name / f"{file.stem}.jpg", quality=90)
            img.save(root / "test" / f"{person.name.replace(' ', '_')}_{file.stem}.jpg", quality=90)
    (root / "done").touch()
    return root


def predict_files(data: Path, images: int) -> list[Path]:
    """The flat test folder's files, repeated up to ``images`` (a Kaggle test folder has 35,000)."""
    paths, _ = list_flat_images(data / "test")
    return (paths * max(1, -(-images // len(paths))))[: max(images, len(paths))]


def data_epochs(dataset: Dataset, images: int) -> int:
    """Epochs per data-pipeline block: enough images that loader start-up does not dominate."""
    return max(1, -(-images // len(dataset)))


# ---- the naive reference: the seed notebook's way ----------------------------------------------
def seed_head(features: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(features, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, classes)
    )


def naive_model(name: str, classes: int) -> nn.Module:
    if name == "resnet50":
        model = tvm.resnet50(weights=None)
        model.fc = seed_head(2048, classes)
    elif name == "mobilenet_v2":
        model = tvm.mobilenet_v2(weights=None)
        model.classifier = seed_head(1280, classes)
    elif name == "sface":
        from facecls.models.sface import FEATURE_DIM, SFace

        # Fine-tuning the whole of SFace with the linear head the sface recipe puts on it (dropout 0.2).
        model = nn.Sequential(SFace(), nn.Dropout(0.2), nn.Linear(FEATURE_DIM, classes))
    else:
        from facecls.models.inception_resnet_v1 import InceptionResnetV1

        model = InceptionResnetV1(num_classes=classes, classify=True, dropout_prob=0.5)
    return model


def naive_train_transform(size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize(round(size * 256 / 224)),
            T.RandomResizedCrop(size, scale=(0.8, 1.0)),
            T.RandomHorizontalFlip(),
            T.RandomRotation(15),
            T.ColorJitter(0.2, 0.2, 0.2, 0.1),
            T.RandomGrayscale(0.1),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class NaiveFiles(Dataset):
    """The notebook's test-set dataset: PIL open, Resize((S, S)), ToTensor, Normalize."""

    def __init__(self, paths: list[Path], size: int):
        self.paths = paths
        self.transform = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(Image.open(self.paths[index]).convert("RGB")), index


class Naive:
    """fp32, NCHW, ImageFolder + PIL transforms, DataLoader defaults (num_workers=0), Adam, all trainable."""

    def __init__(
        self, name: str, data: Path, size: int, batch_size: int, predict_images: int = 0, data_images: int = 0
    ):
        self.dataset = tv_datasets.ImageFolder(str(data / "train"), transform=naive_train_transform(size))
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True)
        self.model = naive_model(name, len(self.dataset.classes))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, betas=(0.9, 0.999))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        paths = predict_files(data, predict_images)
        self.test_loader = DataLoader(NaiveFiles(paths, size), batch_size=batch_size)
        self.data_images = data_images

    def train_epoch(self, max_steps: int | None = None) -> int:
        torch.set_num_threads(DEFAULT_THREADS)
        self.model.train()
        seen, running_loss, correct = 0, 0.0, 0
        for step, (images, labels) in enumerate(self.loader):
            if max_steps is not None and step >= max_steps:
                break
            self.optimizer.zero_grad()
            outputs = self.model(images)
            loss = self.criterion(outputs, labels)
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item() * images.size(0)
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += len(labels)
        return seen

    def predict_pass(self) -> int:
        torch.set_num_threads(DEFAULT_THREADS)
        self.model.eval()
        seen = 0
        with torch.no_grad():
            for images, _ in self.test_loader:
                self.model(images).argmax(1).tolist()
                seen += len(images)
        return seen

    def data_pass(self) -> int:
        return sum(len(labels) for _ in range(data_epochs(self.dataset, self.data_images)) for _, labels in self.loader)

    def meta(self) -> dict:
        return {}


# ---- facecls's own path ------------------------------------------------------------------------
def recipe_resize(name: str, size: int) -> int:
    """The recipe's resize for ``size``: its own resize-to-crop ratio (256/224 for the torchvision recipes,
    1 for sface's aligned crops) applied to ``size``."""
    from facecls.models.registry import get_entry

    recipe = load_recipe(name)
    native = recipe.data.input_size or get_entry(name).default_input_size
    return round(size * (recipe.data.resize or round(native * 256 / 224)) / native)


class Facecls:
    """The recipe's defaults (speed.* untouched unless ``overrides`` say so), fine-tune phase, all trainable.

    The recipe is turned into a plain fine-tuning run (train.frozen_epochs=0, train.unfreeze=all): for
    sface that also leaves out its head phase on stored features, so what is timed is the unfrozen
    training step over images that `facecls train` runs with these overrides. Prediction takes one view
    per image on both sides (model.flip_tta=false: sface's default averages each face with its mirror,
    which would double facecls's work)."""

    def __init__(
        self,
        name: str,
        data: Path,
        size: int,
        batch_size: int,
        cache_root: Path,
        overrides: list[str],
        predict_images: int = 0,
        data_images: int = 0,
    ):
        recipe = load_recipe(
            name,
            [
                "model.weights=none",
                "model.flip_tta=false",
                f"data.input_size={size}",
                f"data.resize={recipe_resize(name, size)}",
                "data.split=[1.0, 0.0, 0.0]",
                f"train.batch_size={batch_size}",
                "train.frozen_epochs=0",
                "train.unfreeze=all",
                "model.head.kind=linear",  # not sface's logistic probe: fitted on stored features
                *overrides,
            ],
        )
        self.recipe = recipe
        self.runtime = resolve_runtime(recipe.speed, "cpu")
        started = time.perf_counter()
        run_data = build_data(recipe, data, self.runtime, cache_root=cache_root, splits=("train",))
        self.cache_seconds = time.perf_counter() - started
        seed_everything(recipe.train.seed)
        # The same builder as `facecls train`: datasets, loader, model, optimizer, scaler, loss, normalisation.
        self.setup = build_training(recipe, data, self.runtime, data=run_data)
        self.dataset = self.setup.data.datasets["train"]
        self.loader = self.setup.train_loader
        self.model = self.setup.model
        self.inference: torch.nn.Module | None = None
        self.predict_first_pass_s: float | None = None
        set_phase(self.model, frozen=False, train=recipe.train)
        self.normalize = self.setup.normalize
        self.optimizer = self.setup.optimizer
        self.step_model = torch.compile(self.model) if self.runtime.compile else self.model
        self.criterion = self.setup.criterion
        self.epoch = 0
        self.test_set = ImageFiles(predict_files(data, predict_images), self.setup.preprocess.input_size)
        self.input_size = self.setup.preprocess.input_size
        self.data_images = data_images

    def _threads(self) -> None:
        torch.set_num_threads(self.runtime.threads)

    def train_epoch(
        self, max_steps: int | None = None, after_step: Callable[[int, RunningStats], None] | None = None
    ) -> int:
        """One epoch (at most ``max_steps`` steps); ``after_step`` is called after each (the profiler's tick)."""
        self._threads()
        ctx = StepContext(
            self.optimizer,
            self.criterion,
            self.runtime,
            self.normalize,
            self.setup.scaler,
            max_steps=max_steps,
        )
        if after_step is not None:
            ctx.after_step = after_step
        self.loader.sampler.set_epoch(self.epoch)
        self.epoch += 1
        stats = train_one_epoch(self.step_model, self.loader, ctx, RunningStats())
        return int(stats.count)

    def predict_pass(self) -> int:
        """What ``facecls predict`` does on a Kaggle-sized test folder: the loader and the model are prepared
        once (BatchNorm folded; compiled, since speed.compile_inference's auto rule turns it on for that many
        images: the first pass, which is the warm-up, pays the compilation and is reported apart), then
        batches. The passes stand for one long pass, so the loader's worker stays up between them, as it
        does through the command's single pass: a worker forked anew for each pass would also start after
        every training block, from a process whose heap is large by then, and the copy-on-write faults that
        follow cost MobileNetV2 at 224 px 0.7 s per 768-image pass, which the command does not pay."""
        self._threads()
        started = time.perf_counter()
        if self.inference is None:
            self.predict_loader = predict_loader(self.test_set, PREDICT_BATCH, self.runtime, persistent=True)
            self.inference = inference_model(
                self.model, self.runtime, self.input_size, KAGGLE_TEST_IMAGES, PREDICT_BATCH
            )
        batches = predict_batches(self.inference, self.predict_loader, self.normalize, self.runtime)
        images = sum(len(pred) for pred, _, _ in batches)
        if self.predict_first_pass_s is None:
            self.predict_first_pass_s = time.perf_counter() - started
        return images

    def data_pass(self) -> int:
        images = 0
        for _ in range(data_epochs(self.dataset, self.data_images)):
            self.loader.sampler.set_epoch(self.epoch)
            self.epoch += 1
            images += sum(len(labels) for _, labels, _ in self.loader)
        return images

    def meta(self) -> dict:
        """What the run table records about this side besides its speed."""
        return {
            "runtime": self.runtime.as_dict(),
            "cache_build_s": self.cache_seconds,
            "predict_first_pass_s": self.predict_first_pass_s,
            "predict_compiled": isinstance(self.inference, CompiledInference) and not self.inference.failure,
        }


# ---- measurement -------------------------------------------------------------------------------
def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """Each of grad-input and grad-weight costs what the forward convolution costs. (torch's own formula
    ignores groups for grad-weight: 11.7 instead of 1.2 GFLOP per image for MobileNetV2's backward.)"""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def train_flops_per_image(name: str, size: int) -> float:
    """FLOPs of one forward + backward per image, counted by FlopCounterMode (precision does not change it)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = naive_model(name, 24).train()
    x = torch.randn(4, 3, size, size)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 4


def predict_flops_per_image(name: str, size: int) -> float:
    """FLOPs of one inference forward per image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = naive_model(name, 24).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.randn(2, 3, size, size))
    return counter.get_total_flops() / 2


def side_main(args) -> None:
    """A side process: build the runner for one configuration, then serve blocks (bench_sides.serve)."""
    ((name, size),) = args.configs
    if args.side == FACECLS:
        runner = Facecls(
            name, args.data, size, args.batch_size, args.cache, args.set, args.predict_images, args.data_images
        )
    else:
        runner = Naive(name, args.data, size, args.batch_size, args.predict_images, args.data_images)
    serve({"train": runner.train_epoch, "predict": runner.predict_pass, "data": runner.data_pass}, runner.meta)


def memory_child(args) -> None:
    """Subprocess: a few training steps of one side, then print the peak RSS as JSON."""
    ((name, size),) = args.configs
    if args.memory_child == FACECLS:
        runner = Facecls(name, args.data, size, args.batch_size, args.cache, args.set)
    else:
        runner = Naive(name, args.data, size, args.batch_size)
    runner.train_epoch(max_steps=args.memory_steps)
    # DataLoader workers are alive (persistent) at this point: read their high-water marks too.
    iterator = getattr(runner.loader, "_iterator", None)
    workers = [peak_rss_mb(w.pid) for w in getattr(iterator, "_workers", [])]
    print(json.dumps({"main_mb": peak_rss_mb(), "worker_mb": sum(workers), "workers": len(workers)}))


def side_command(args, name: str, size: int, data: Path) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--configs",
        f"{name}@{size}",
        "--data",
        str(data),
        "--cache",
        str(args.cache),
        "--batch-size",
        str(args.batch_size),
        "--predict-images",
        str(args.predict_images),
        "--data-images",
        str(args.data_images),
        "--memory-steps",
        str(args.memory_steps),
        *[f"--set={s}" for s in args.set],
    ]


def measure_memory(args, name: str, size: int, side: str, data: Path) -> dict:
    command = [*side_command(args, name, size, data), "--_memory-child", side]
    env = side_environment(side, not args.no_jemalloc)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def lscpu_summary() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache")
    lines = [line for line in text.splitlines() if line.startswith(keep)]
    flags = next((line for line in text.splitlines() if line.startswith("Flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags.split()]
    return "; ".join(" ".join(line.split()) for line in lines) + f"; ISA: {', '.join(isa)}"


def run(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="facecls-bench-"))
    args.cache = work / "cache"
    kinds = [NAIVE, NAIVE_ALLOC, FACECLS] if args.naive_alloc else [NAIVE, FACECLS]
    results = {
        "machine": lscpu_summary(),
        "facecls_allocator": not args.no_jemalloc,
        "torch": torch.__version__,
        "default_threads": DEFAULT_THREADS,
        "batch_size": args.batch_size,
        "images": f"{args.identities} identities x {args.per_identity} images",
        "rounds": args.rounds,
        "sides": kinds,
        "data_images_per_block": args.data_images,
        "predict_images_per_pass": args.predict_images,
        "predict_batch": {"naive": args.batch_size, "facecls": PREDICT_BATCH},
        "overrides": args.set,
        "configs": [],
    }
    print(f"torch {torch.__version__}; {DEFAULT_THREADS} threads; {results['machine']}", flush=True)
    timm, results["timm"] = timm_setup(args)
    print(f"timm: {timm_text(results['timm'])}", flush=True)
    peaks = measure_peaks()
    print(f"peaks: {peak_text(peaks)}", flush=True)
    for name, size in args.configs:
        data = make_jpeg_data(args.faces, work, size, args.identities, args.per_identity)
        print(f"== {name} @ {size}px", flush=True)
        command = side_command(args, name, size, data)
        sides = {kind: SideProcess(kind, command, not args.no_jemalloc) for kind in kinds}
        try:
            if "environment" not in results:
                results["environment"] = {kind: side.meta["environment"] for kind, side in sides.items()}
                for kind, environment in results["environment"].items():
                    print(f"   {kind:12s} {environment}", flush=True)
            config = {"model": name, "size": size}
            for block in ("data", "train", "predict"):
                config[block] = interleaved(sides, block, args.rounds)
                print(f"   {block:8s} {fmt(config[block])}", flush=True)
            meta = sides[FACECLS].call("meta")
            if timm is None:
                config["timm"] = {"status": "not run"}
            else:
                config["timm"] = timm_between(args, timm, sides[FACECLS], name, size, data, work / "timm")
            print(f"   timm     {timm_row_text(config['timm'], config['train'][FACECLS])}", flush=True)
        finally:
            for side in sides.values():
                side.close()
        config.update(meta)
        print(
            f"   predict setup  compiled: {meta['predict_compiled']}; first pass (with compilation) "
            f"{meta['predict_first_pass_s']:.1f} s",
            flush=True,
        )
        config["train_gflop_per_image"] = train_flops_per_image(name, size) / 1e9
        config["predict_gflop_per_image"] = predict_flops_per_image(name, size) / 1e9
        if args.memory:
            config["memory"] = {side: measure_memory(args, name, size, side, data) for side in (NAIVE, FACECLS)}
            print(f"   peak RSS MiB   {config['memory']}", flush=True)
        results["configs"].append(config)
    end_peaks = measure_peaks()
    # The higher of the two measurements is the better estimate of what the cores can do.
    for kind in ("matmul", "conv"):
        results[f"{kind}_peak_gflops"] = {p: max(peaks[kind][p], end_peaks[kind][p]) for p in peaks[kind]}
        results[f"{kind}_peak_gflops_start_end"] = {p: [peaks[kind][p], end_peaks[kind][p]] for p in peaks[kind]}
    return results


def timm_between(args, timm, facecls: SideProcess, name: str, size: int, data: Path, workdir: Path) -> dict:
    """timm's run for the model ``name`` at ``size`` px on ``data``, between two facecls training blocks
    (the facecls process waits idle meanwhile). timm's process cannot alternate with the others block by
    block, and this machine's speed drifts by up to 30% over minutes; facecls's speed in the blocks next to
    timm's run, ``facecls_adjacent_img_s``, is what the facecls / timm ratio compares with.

    Each of the two is preceded by an untimed block, as timm's speed leaves out its first epoch: the first
    training block after the prediction passes, or after minutes idle, ran 20-25% slower than the next one
    (MobileNetV2 at 112 px on the EPYC: 87.9 then 114.1 img/s after predict, 83.1 then 105.1 after 90 s)."""
    classes = sum(1 for d in (data / "train").iterdir() if d.is_dir())
    optimizer = load_recipe(name).optim.name
    if name not in TIMM_MODELS:
        return run_timm(timm, name, data, size, args.batch_size, classes, args.rounds, optimizer, workdir)
    facecls.block("train")
    before = facecls.block("train")
    row = run_timm(timm, name, data, size, args.batch_size, classes, args.rounds, optimizer, workdir)
    facecls.block("train")
    after = facecls.block("train")
    row["facecls_adjacent_img_s"] = (before[0] + after[0]) / (before[1] + after[1])
    return row


def facecls_over_timm(row: dict, facecls_img_s: float) -> float:
    """facecls / timm, against facecls's blocks next to timm's run where the run has them."""
    return row.get("facecls_adjacent_img_s", facecls_img_s) / row["img_s"]


def timm_setup(args) -> tuple:
    """The timm side (None when it does not run) and what the results record about it."""
    if args.no_timm:
        return None, {"status": "not run (--no-timm)"}
    side, why = find_timm(
        args.timm_train,
        args.timm_python,
        CHECKOUT.parent,
        workers=args.timm_workers,
        compile=args.timm_compile,
        jemalloc=args.timm_jemalloc,
        extra=tuple(args.timm_arg),
    )
    if side is None:
        return None, {"status": why}
    try:
        version = timm_version(side)
    except RuntimeError as exc:
        return None, {"status": f"not run ({exc})"}
    environment = side.environment()
    return side, {
        "status": "ok",
        "train_py": str(side.train_py),
        "python": side.python,
        **version,
        "workers": side.workers,
        "flags": list(timm_flags()),
        "variants": list(VARIANTS[side.compile]),
        "extra": list(side.extra),
        "environment": {k.lower(): environment.get(k, "") for k in ("LD_PRELOAD", "MALLOC_CONF", "OMP_WAIT_POLICY")},
    }


def timm_text(timm: dict) -> str:
    if timm.get("status") != "ok":
        return timm.get("status", "not run")
    flags = timm.get("flags", [*BF16_FLAGS, *LAYOUT_FLAGS])  # runs from before flags were recorded used these
    variants = " and ".join(f"{v} ({'--torchcompile' if v == 'compiled' else 'no compile'})" for v in timm["variants"])
    return (
        f"train.py of timm {timm['timm']} (commit {timm['commit']}), torch {timm['torch']}; "
        f"{' '.join([*flags, '--workers', str(timm['workers']), *timm['extra']])}; "
        f"{variants}, the faster counts; allocator: {timm['environment']['ld_preload'] or 'system'}"
    )


def timm_row_text(row: dict, facecls_img_s: float) -> str:
    if row.get("status") != "ok":
        errors = [f"{v}: {e['error']}" for v, e in row.get("variants", {}).items() if "error" in e]
        return "; ".join([row.get("status", "not run"), *filter(None, [row.get("why")]), *errors])
    per = "  ".join(
        f"{v} {e['img_s']:.1f}" if "img_s" in e else f"{v} failed: {e['error']}" for v, e in row["variants"].items()
    )
    text = f"{per} img/s; facecls / timm x{facecls_over_timm(row, facecls_img_s):.2f}"
    if "facecls_adjacent_img_s" in row:
        text += f" (facecls {row['facecls_adjacent_img_s']:.1f} img/s in the blocks before and after timm's run)"
    return text


def timm_cells(config: dict) -> str:
    """The table's timm cells: img/s (variant) and facecls / timm."""
    row = config.get("timm")
    if row is None:
        return "- | -"
    if row.get("status") != "ok":
        return f"{row.get('status', 'not run').split(' (')[0]} | -"
    return f"{row['img_s']:.1f} ({row['variant']}) | {facecls_over_timm(row, config['train'][FACECLS]):.2f}"


def peak_precisions() -> tuple[str, ...]:
    """The precisions to measure peaks in: bf16 only where the CPU computes it in hardware. Elsewhere it is
    emulated (one 2048^3 bf16 torch.mm took 248 s on an AVX2-only EPYC) and nothing here runs in it."""
    return ("fp32", "bf16") if cpu_supports_bf16() else ("fp32",)


def measure_peaks() -> dict:
    """GFLOP/s of torch.mm and of a convolution, in fp32 and (where the CPU has it) bf16."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {
        kind: {name: peak(dtypes[name]) / 1e9 for name in peak_precisions()}
        for kind, peak in (("matmul", matmul_peak), ("conv", conv_peak))
    }


def peak_text(peaks: dict) -> str:
    """``peaks``: {"conv"|"matmul": {"fp32"|"bf16": GFLOP/s}} (either kind may be missing)."""
    return "; ".join(
        f"{kind} " + ", ".join(f"{precision} {gflops:.0f} GFLOP/s" for precision, gflops in peaks[kind].items())
        for kind in ("conv", "matmul")
        if kind in peaks
    )


def fmt(m: dict) -> str:
    text = "  ".join(f"{side} {m[side]:7.1f}" for side in (NAIVE, NAIVE_ALLOC, FACECLS) if side in m)
    text += f" img/s  x{m['ratio']:.2f}"
    if "ratio_alloc" in m:
        text += f" (x{m['ratio_alloc']:.2f} vs naive with facecls's allocator)"
    return text + "  rounds: " + " ".join(f"{r:.2f}" for r in m["ratio_per_round"])


def table(results: dict) -> str:
    # Runs before the convolution peak was measured have only the matmul peak.
    kind = "conv" if "conv_peak_gflops" in results else "matmul"
    peaks = results[f"{kind}_peak_gflops"]
    shown = {k: results[f"{k}_peak_gflops"] for k in ("conv", "matmul") if f"{k}_peak_gflops" in results}
    lines = [
        f"batch {results['batch_size']}; {results['images']}; {results['rounds']} timed round(s) after a warm-up "
        f"block; peaks: {peak_text(shown)}; percentages of the {kind} peak",
        "",
        "| model | px | train naive | train facecls | x | train timm | facecls / timm "
        "| predict naive | predict facecls | x "
        "| data naive | data facecls | data / fastest model | train GFLOP/s naive (% fp32 peak) "
        "| train GFLOP/s facecls (% peak of its precision) | 3x naive needs (% peak of its precision) "
        "| predict GFLOP/s naive (% fp32 peak) "
        "| predict GFLOP/s facecls (% peak of its precision) | peak RSS MiB naive / facecls (+worker) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_size: dict[int, float] = {}
    for c in results["configs"]:
        by_size[c["size"]] = max(by_size.get(c["size"], 0.0), c["train"][FACECLS])
    for c in results["configs"]:
        tr, pr, da = c["train"], c["predict"], c["data"]
        gflops = {side: c["train_gflop_per_image"] * tr[side] for side in (NAIVE, FACECLS)}
        pf = {side: c.get("predict_gflop_per_image", 0.0) * pr[side] for side in (NAIVE, FACECLS)}
        # facecls computes in bf16 where the CPU has it in hardware, else fp32 (run.json's precision).
        own_peak = peaks[c.get("runtime", {}).get("precision", "bf16")]
        # The training target is 3x the naive loop: the share of facecls's peak that would take. Where the naive
        # loop already runs near the fp32 peak and bf16's peak is only ~2x fp32's, this is out of reach.
        needed = 100 * TRAIN_TARGET * gflops[NAIVE] / own_peak
        mem = c.get("memory")
        mem_text = "-"
        if mem and "error" not in mem[NAIVE] and "error" not in mem[FACECLS]:
            mem_text = f"{mem[NAIVE]['main_mb']:.0f} / {mem[FACECLS]['main_mb']:.0f} (+{mem[FACECLS]['worker_mb']:.0f})"
        lines.append(
            f"| {c['model']} | {c['size']} | {tr[NAIVE]:.1f} | {tr[FACECLS]:.1f} | {tr['ratio']:.2f} | {timm_cells(c)} "
            f"| {pr[NAIVE]:.1f} | {pr[FACECLS]:.1f} | {pr['ratio']:.2f} "
            f"| {da[NAIVE]:.0f} | {da[FACECLS]:.0f} | {da[FACECLS] / by_size[c['size']]:.1f} "
            f"| {gflops[NAIVE]:.0f} ({100 * gflops[NAIVE] / peaks['fp32']:.0f}%) "
            f"| {gflops[FACECLS]:.0f} ({100 * gflops[FACECLS] / own_peak:.0f}%) | {needed:.0f}% "
            f"| {pf[NAIVE]:.0f} ({100 * pf[NAIVE] / peaks['fp32']:.0f}%) "
            f"| {pf[FACECLS]:.0f} ({100 * pf[FACECLS] / own_peak:.0f}%) | {mem_text} |"
        )
    if "timm" in results:
        lines += ["", f"timm side: {timm_text(results['timm'])}"]
    if NAIVE_ALLOC in results.get("sides", []):
        lines += [
            "",
            "The naive loop under facecls's allocator settings (what the allocator alone gives it), and facecls "
            "against that:",
            "",
            "| model | px | train naive | train naive, facecls allocator | train facecls | x | "
            "predict naive | predict naive, facecls allocator | predict facecls | x |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in results["configs"]:
            tr, pr = c["train"], c["predict"]
            lines.append(
                f"| {c['model']} | {c['size']} | {tr[NAIVE]:.1f} | {tr[NAIVE_ALLOC]:.1f} | {tr[FACECLS]:.1f} "
                f"| {tr['ratio_alloc']:.2f} | {pr[NAIVE]:.1f} | {pr[NAIVE_ALLOC]:.1f} | {pr[FACECLS]:.1f} "
                f"| {pr['ratio_alloc']:.2f} |"
            )
    return "\n".join(lines)


def parse_config(text: str) -> tuple[str, int]:
    """``MODEL@PX`` -> (model, px); ValueError naming what is wrong."""
    name, _, size = text.partition("@")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} in {text!r}; choose one of: {', '.join(MODELS)}")
    if not size.isdigit() or int(size) < 32:
        raise ValueError(f"{text!r}: write MODEL@PX with PX a resolution of at least 32, e.g. {name}@224")
    if FIXED_SIZE.get(name, int(size)) != int(size):
        raise ValueError(f"{text!r}: {name} runs at {FIXED_SIZE[name]} px only")
    return name, int(size)


def resolve_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, int]]:
    """--configs as given; else the grid of --models x --sizes (leaving out, and naming, the pairs a model
    of fixed resolution cannot run); else the default set."""
    if args.configs:
        if args.models or args.sizes:
            parser.error("--configs replaces --models/--sizes: give one or the other")
        try:
            return [parse_config(text) for text in args.configs]
        except ValueError as exc:
            parser.error(str(exc))
    if not (args.models or args.sizes):
        return list(DEFAULT_CONFIGS)
    grid = [(name, size) for size in args.sizes or SIZES for name in args.models or MODELS]
    left_out = [f"{n}@{s}" for n, s in grid if FIXED_SIZE.get(n, s) != s]
    if left_out:
        print(f"left out {len(left_out)} pair(s) of fixed-resolution models: {' '.join(left_out)}", file=sys.stderr)
    configs = [(n, s) for n, s in grid if FIXED_SIZE.get(n, s) == s]
    if not configs:
        parser.error("no model runs at the sizes given (sface: 112 px only)")
    return configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: batch 32, 4 images per identity, one timed round, short passes",
    )
    p.add_argument(
        "--faces",
        type=Path,
        default=CELEB24,
        help="real faces as DIR/<identity>/<image> (default: ../shared/data/celeb24 beside the checkout)",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="MODEL@PX",
        help="model and resolution pairs, e.g. resnet50@224 sface@112 inception_resnet_v1@160 (default: "
        + " ".join(f"{n}@{s}" for n, s in DEFAULT_CONFIGS)
        + ")",
    )
    p.add_argument("--models", nargs="+", choices=MODELS, help="with --sizes: every model at every size")
    p.add_argument("--sizes", nargs="+", type=int, help=f"with --models (default sizes: {' '.join(map(str, SIZES))})")
    p.add_argument("--batch-size", type=int, help="training batch (default: the recipes' 64, --quick 32)")
    p.add_argument("--identities", type=int, default=24)
    p.add_argument("--per-identity", type=int, help="images per identity (default 20, --quick 4)")
    p.add_argument("--rounds", type=int, help="timed rounds per measurement (default 2, --quick 1)")
    p.add_argument("--predict-images", type=int, help="images per prediction pass (default 1000, --quick 200)")
    p.add_argument("--data-images", type=int, help="images per data-pipeline block (default 1500, --quick 500)")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        help="peak RSS per configuration and side, in subprocesses (default: on, off with --quick)",
    )
    p.add_argument("--memory-steps", type=int, help="training steps before reading peak RSS (default 3, --quick 2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the facecls side, e.g. --set speed.workers=0",
    )
    p.add_argument("--no-jemalloc", action="store_true", help="the facecls side without its allocator settings")
    p.add_argument(
        "--naive-alloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the naive loop under facecls's allocator settings (default: on)",
    )
    p.add_argument(
        "--timm-train",
        type=Path,
        metavar="PATH",
        help="timm's train.py (a pytorch-image-models checkout) for the timm side (default: ../timm/train.py "
        "beside the checkout, if there)",
    )
    p.add_argument(
        "--timm-python",
        metavar="PATH",
        help="the Python of timm's environment (default: ../timmenv/bin/python if there, else this one)",
    )
    p.add_argument("--no-timm", action="store_true", help="leave the timm side out")
    p.add_argument(
        "--timm-compile",
        choices=sorted(VARIANTS),
        default="both",
        help="run timm with --torchcompile: off, on, or both and take the faster (default: both)",
    )
    p.add_argument("--timm-workers", type=int, default=1, help="timm's --workers (default 1, as facecls on CPU)")
    p.add_argument(
        "--timm-jemalloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run timm under the allocator settings the facecls side gets (default: on)",
    )
    p.add_argument(
        "--timm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more train.py argument (repeat), e.g. --timm-arg=--opt-kwargs --timm-arg=fused=True",
    )
    p.add_argument("--workdir", type=Path, help="keep the JPEGs and the decoded cache here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the table of an earlier run's JSON and exit")
    p.add_argument("--_side", dest="side", choices=[NAIVE, NAIVE_ALLOC, FACECLS], help=argparse.SUPPRESS)
    p.add_argument("--_memory-child", dest="memory_child", choices=[NAIVE, FACECLS], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.configs = resolve_configs(p, args)
    args.batch_size = args.batch_size or (32 if args.quick else 64)
    args.per_identity = args.per_identity or (4 if args.quick else 20)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.predict_images = args.predict_images or (200 if args.quick else 1000)
    args.memory_steps = args.memory_steps or (2 if args.quick else 3)
    args.data_images = args.data_images or (500 if args.quick else 1500)
    args.memory = (not args.quick) if args.memory is None else args.memory
    return args


def main() -> int:
    args = parse_args()
    if args.report:
        print(table(json.loads(args.report.read_text())))
        return 0
    child = args.side or args.memory_child
    if child in (NAIVE_ALLOC, FACECLS):
        reexec_with_jemalloc(sys.argv)  # as the facecls command does: jemalloc, or glibc told to keep memory
    if args.side:
        side_main(args)
        return 0
    if args.memory_child:
        memory_child(args)
        return 0
    results = run(args)
    print()
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

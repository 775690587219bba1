"""Bad usage gets one clear line: what is wrong and what to do, exit code 2, no traceback."""

from __future__ import annotations

import json

import torch
from PIL import Image

from facecls.core.checkpoint import load_checkpoint, save_checkpoint

from .conftest import assert_one_line_error, cli_subprocess, copy_run, tiny_args


def _after_logs(result) -> str:
    """Commands that log progress before failing: the failure itself is one line, no traceback."""
    errors = [line for line in result.error_lines if line.startswith("facecls: error:")]
    assert result.code == 2 and "Traceback" not in result.err and len(errors) == 1, result.err
    return errors[0]


# ---- paths ---------------------------------------------------------------------------------------------


def test_missing_data_folder(run_cli, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--data", tmp_path / "nope", "--out", out, *tiny_args())
    assert_one_line_error(result, str(tmp_path / "nope"), "does not exist")
    assert not out.exists(), "no run folder is left behind for a wrong --data"


def test_data_folder_without_train(run_cli, tmp_path):
    (tmp_path / "data" / "alice").mkdir(parents=True)
    result = run_cli("train", "--data", tmp_path / "data", "--out", tmp_path / "run", *tiny_args())
    assert_one_line_error(result, "no train/ folder", "train/<identity>/<image>")


def test_missing_run_folder_for_evaluate_and_predict(run_cli, tmp_path):
    assert_one_line_error(run_cli("evaluate", tmp_path / "nope"), "does not exist")
    (tmp_path / "imgs").mkdir()
    assert_one_line_error(run_cli("predict", tmp_path / "nope", "--images", tmp_path / "imgs"), "does not exist")
    assert_one_line_error(run_cli("evaluate", tmp_path / "imgs"), "not a facecls run folder")
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    result = run_cli("embed", tmp_path / "model.onnx", "--images", tmp_path / "imgs", "--out", tmp_path / "e.npy")
    assert_one_line_error(result, "is a file, not a run folder", "facecls predict")
    assert_one_line_error(run_cli("report", tmp_path / "model.onnx"), "is a file, not a run folder", "facecls predict")


def test_missing_images_folder_for_predict(run_cli, trained_run, tmp_path):
    assert_one_line_error(run_cli("predict", trained_run.run, "--images", tmp_path / "nope"), "does not exist")


# ---- recipes -------------------------------------------------------------------------------------------


def test_unknown_recipe(run_cli, messy_data, tmp_path):
    result = run_cli("train", "--recipe", "resnet5", "--data", messy_data.root, "--out", tmp_path / "r")
    assert_one_line_error(result, "recipe 'resnet5' not found", "mobilenet_v2", "sface_ncm")


def test_recipe_file_with_unknown_key(run_cli, messy_data, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nmodel: {name: mobilenet_v2}\ntrain: {epochz: 3}\n")
    result = run_cli("train", "--recipe", recipe, "--data", messy_data.root, "--out", tmp_path / "r")
    assert_one_line_error(result, "unknown key 'train.epochz'", "epochs")


def test_recipe_file_with_wrong_type_and_bad_yaml(run_cli, messy_data, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model: {name: mobilenet_v2}\ntrain: {batch_size: '64'}\n")
    result = run_cli("train", "--recipe", recipe, "--data", messy_data.root, "--out", tmp_path / "r")
    assert_one_line_error(result, "train.batch_size", "integer")
    recipe.write_text("train: {epochs: 3\n  - oops\n")
    result = run_cli("train", "--recipe", recipe, "--data", messy_data.root, "--out", tmp_path / "r")
    assert_one_line_error(result, "not valid YAML")


def test_override_with_wrong_type_or_unknown_key(run_cli, messy_data, tmp_path):
    base = ["train", "--recipe", "mobilenet_v2", "--data", messy_data.root, "--out", tmp_path / "r"]
    assert_one_line_error(run_cli(*base, "--set", "train.epochs=three"), "train.epochs", "integer")
    assert_one_line_error(run_cli(*base, "--set", "optim.lrr=0.1"), "unknown key 'optim.lrr'")
    assert_one_line_error(run_cli(*base, "--set", "speed.precision=fp8"), "speed.precision", "fp32")
    assert_one_line_error(run_cli(*base, "--set", "train.epochs"), "section.field=value")


def test_train_without_recipe_or_data(run_cli, tmp_path):
    assert_one_line_error(run_cli("train", "--out", tmp_path / "r"), "--recipe and --data")


# ---- run folders and checkpoints -----------------------------------------------------------------------


def test_training_into_a_folder_that_holds_a_run(run_cli, trained_run, messy_data):
    result = run_cli("train", "--data", messy_data.root, "--out", trained_run.run, *tiny_args())
    assert_one_line_error(result, "already holds a run", f"--resume {trained_run.run}")


def test_resuming_a_finished_run(run_cli, trained_run):
    result = run_cli("train", "--resume", trained_run.run)
    assert_one_line_error(result, "already finished", "facecls evaluate")


def test_resuming_a_folder_without_a_run(run_cli, tmp_path):
    assert_one_line_error(run_cli("train", "--resume", tmp_path / "nope"), "nothing to resume", "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("train", "--resume", tmp_path / "empty"), "nothing to resume", "--recipe and --data")


def test_resume_with_recipe_or_overrides(run_cli, trained_run):
    result = run_cli("train", "--resume", trained_run.run, "--set", "train.epochs=9")
    assert_one_line_error(result, "--resume continues a run", "drop --recipe/--data/--set")


def test_resume_after_the_split_changed(run_cli, trained_run, tmp_path, one_core):
    run = copy_run(trained_run.run, tmp_path / "run", unfinished=True)
    split = (run / "split.csv").read_bytes().splitlines()
    (run / "split.csv").write_bytes(b"\n".join(split[:-1]) + b"\n")  # one image fewer
    line = _after_logs(run_cli("train", "--resume", run, "--no-progress"))
    assert "split.csv changed" in line and "cannot resume" in line


def test_resume_after_the_data_folder_moved(run_cli, trained_run, tmp_path):
    run = copy_run(trained_run.run, tmp_path / "run", unfinished=True)
    info = json.loads((run / "run.json").read_text())
    info["data_dir"] = str(tmp_path / "moved")
    (run / "run.json").write_text(json.dumps(info))
    line = _after_logs(run_cli("train", "--resume", run, "--no-progress"))
    assert "missing under" in line and "same data folder" in line


def _checkpoint_variant(trained_run, tmp_path, **changes):
    state = load_checkpoint(trained_run.run / "best.ckpt")
    state.update(changes)
    path = tmp_path / "other.ckpt"
    save_checkpoint(state, path)
    return path


def test_checkpoint_of_another_class_list(run_cli, trained_run, tmp_path):
    classes = json.loads((trained_run.run / "classes.json").read_text())["class_names"]
    path = _checkpoint_variant(trained_run, tmp_path, class_names=[*classes[:-1], "somebody else"])
    result = run_cli("evaluate", trained_run.run, "--checkpoint", path)
    assert_one_line_error(result, str(path), "another class list")
    images = trained_run.data.root / "train" / "s1"
    result = run_cli("predict", trained_run.run, "--images", images, "--checkpoint", path)
    assert_one_line_error(result, "another class list")


def test_checkpoint_of_another_model(run_cli, trained_run, tmp_path):
    path = _checkpoint_variant(trained_run, tmp_path, model_name="resnet50")
    assert_one_line_error(run_cli("evaluate", trained_run.run, "--checkpoint", path), "holds a resnet50")
    state = load_checkpoint(trained_run.run / "best.ckpt")
    model = {k: torch.zeros(3) if k.endswith("weight") else v for k, v in state["model"].items()}
    path = _checkpoint_variant(trained_run, tmp_path, model=model)
    assert_one_line_error(run_cli("evaluate", trained_run.run, "--checkpoint", path), "does not fit", "another model")


def test_missing_or_corrupt_checkpoint_file(run_cli, trained_run, tmp_path):
    assert_one_line_error(run_cli("evaluate", trained_run.run, "--checkpoint", tmp_path / "x.ckpt"), "not found")
    (tmp_path / "torn.ckpt").write_bytes((trained_run.run / "best.ckpt").read_bytes()[:5000])
    result = run_cli("evaluate", trained_run.run, "--checkpoint", tmp_path / "torn.ckpt")
    assert_one_line_error(result, "not a readable facecls checkpoint")


def test_cli_subprocess_prints_one_line(tmp_path):
    """The same through the real entry point: one line on stderr, exit code 2."""
    result = cli_subprocess("evaluate", tmp_path / "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"facecls: error: run folder {tmp_path / 'nope'} does not exist"]

"""Bad data never crashes a run and nothing is lost silently: unreadable files are skipped, counted and
listed; every readable image is used; awkward formats decode to upright RGB; predict either writes a
row per image or fails up front naming the unreadable ones."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from facecls.commands.evaluate import load_run
from facecls.core.download import cache_dir
from facecls.data.images import UnreadableImage, load_image, open_rgb
from facecls.data.pipeline import build_datasets
from facecls.data.scan import unescape_name
from facecls.data.split import read_manifest
from facecls.runtime.distributed import DistEnv

from .conftest import assert_one_line_error, write_awkward_images, write_bad_files, write_exif_rotated


def _csv(path: Path) -> list[dict]:
    """Rows of a CSV facecls wrote: strict UTF-8; file names (the first column) given back as the names
    they escape."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        first = reader.fieldnames[0]
        return [{**row, first: unescape_name(row[first])} for row in reader]


# ---- decoding ----------------------------------------------------------------------------------------


def test_broken_files_raise_unreadable_image(tmp_path):
    for name in write_bad_files(tmp_path):
        with pytest.raises(UnreadableImage):
            load_image(tmp_path / name, 16)


def test_awkward_formats_decode_to_rgb(tmp_path):
    for name in write_awkward_images(tmp_path):
        array = load_image(tmp_path / name, 24)
        assert array.shape == (24, 24, 3) and array.dtype == np.uint8, name


def test_exif_rotated_image_decodes_upright(tmp_path):
    write_exif_rotated(tmp_path / "rotated.jpg")
    assert open_rgb(tmp_path / "rotated.jpg").size == (40, 60)  # width x height once upright
    array = np.asarray(open_rgb(tmp_path / "rotated.jpg"), dtype=int)
    left, right = array[:, :15].mean(axis=(0, 1)), array[:, -15:].mean(axis=(0, 1))
    assert left[2] > 200 and left[0] < 50, left  # blue on the left
    assert right[0] > 200 and right[2] < 50, right  # red on the right


def test_16_bit_png_scales_to_the_full_8_bit_range(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    Image.fromarray(np.full((32, 32), 256 * 100, np.uint16)).save(tmp_path / "mid.png")
    Image.fromarray(np.full((32, 32), 200, np.uint16)).save(tmp_path / "dark.png")  # dark stays dark
    ramp8 = load_image(tmp_path / "ramp.png", 32)
    assert ramp8[0, 0].tolist() == [0, 0, 0] and ramp8[-1, -1].tolist() == [255, 255, 255]
    assert load_image(tmp_path / "mid.png", 32)[0, 0].tolist() == [100, 100, 100]
    assert load_image(tmp_path / "dark.png", 32)[0, 0].tolist() == [1, 1, 1]


def test_cmyk_rgba_and_grey_become_rgb(tmp_path):
    from PIL import Image

    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "red_cmyk.jpg", quality=100)
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 1], rgba[10:, :, 3] = 255, 255  # green, top half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.new("L", (20, 20), 77).save(tmp_path / "grey.pgm")
    red = load_image(tmp_path / "red_cmyk.jpg", 20)[10, 10]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    rgb = load_image(tmp_path / "rgba.png", 20)
    assert rgb[2, 10].tolist() == [0, 0, 0] and rgb[17, 10].tolist() == [0, 255, 0]  # on black
    assert load_image(tmp_path / "grey.pgm", 20)[5, 5].tolist() == [77, 77, 77]


# ---- training on a messy folder ---------------------------------------------------------------------


def test_training_skips_counts_and_lists_bad_files(trained_run):
    run, data = trained_run.run, trained_run.data
    skipped = {row["path"]: row["reason"] for row in _csv(run / "skipped_files.csv")}
    assert set(skipped) == data.unreadable | data.skipped_other
    assert all(skipped[path].startswith("unreadable image") for path in data.unreadable)
    total = len(data.unreadable) + len(data.skipped_other)
    assert f"{total} files left out ({len(data.unreadable)} unreadable), see skipped_files.csv" in trained_run.log
    assert json.loads((run / "run.json").read_text())["skipped_files"] == total
    classes = json.loads((run / "classes.json").read_text())["class_names"]
    assert "José Ñúñez" in classes and "solo" in classes and "duo" in classes and "empty_person" not in classes


def test_every_readable_image_is_in_the_split_and_in_a_dataset(trained_run):
    run, data = trained_run.run, trained_run.data
    manifest = read_manifest(run / "split.csv")
    assert {row.path for row in manifest} == data.readable | data.unreadable  # every image file, once
    info = json.loads((run / "run.json").read_text())
    loaded = load_run(run, device="cpu")
    split = build_datasets(
        Path(info["data_dir"]),
        manifest,
        loaded.preprocess,
        loaded.recipe.data.augment,
        use_cache=True,
        cache_root=cache_dir() / "decoded",
        workers=1,
        env=DistEnv(),
        class_names=loaded.class_names,
    )
    used = [p.relative_to(data.root).as_posix() for ds in split.datasets.values() for p in ds.paths]
    assert len(used) == len(set(used)) and set(used) == data.readable
    assert {s.path for s in split.skipped} == data.unreadable
    evals = [json.loads((run / f"eval_{s}.json").read_text()) for s in ("val", "test")]
    n_train = len(split.datasets["train"])
    assert n_train + sum(e["count"] for e in evals) == len(data.readable)


# ---- predict -------------------------------------------------------------------------------------------


@pytest.fixture
def test_folder(tmp_path, faces_data) -> tuple[Path, list[str], list[str]]:
    """A flat folder: real faces, awkward formats, broken files and a hidden file."""
    folder = tmp_path / "test images"
    folder.mkdir()
    for j in range(1, 4):
        shutil.copy(faces_data / "orl" / "s1" / f"{j + 6}.pgm", folder / f"visage n°{j}.pgm")
    latin1 = os.fsdecode(b"f\xe9e.pgm")  # not valid UTF-8: the submission names it escaped (f\\xe9e.pgm)
    shutil.copy(faces_data / "orl" / "s1" / "10.pgm", folder / latin1)
    readable = [f"visage n°{j}.pgm" for j in range(1, 4)] + [latin1] + write_awkward_images(folder)
    bad = write_bad_files(folder)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return folder, readable, bad


def test_predict_fails_up_front_naming_the_unreadable_images(trained_run, test_folder, tmp_path, run_cli, one_core):
    folder, _, bad = test_folder
    out = tmp_path / "submission.csv"
    result = run_cli("predict", trained_run.run, "--images", folder, "--out", out, "--no-progress")
    line = assert_one_line_error(result, f"{len(bad)} of ", "--skip-unreadable", *bad)
    assert "unreadable" in line
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_predict_skip_unreadable_writes_the_rest_and_names_the_skipped(
    trained_run, test_folder, tmp_path, run_cli, one_core
):
    folder, readable, bad = test_folder
    out = tmp_path / "submission.csv"
    result = run_cli("predict", trained_run.run, "--images", folder, "--out", out, "--skip-unreadable", "--no-progress")
    assert result.code == 0, result.err
    rows = _csv(out)
    assert sorted(r["image_name"] for r in rows) == sorted(readable)
    classes = set(json.loads((trained_run.run / "classes.json").read_text())["class_names"])
    assert all(r["label"] in classes for r in rows)
    assert f"skipped {len(bad)} unreadable images" in result.err
    assert all(name in result.err for name in bad)


def test_predict_writes_a_row_for_every_image(trained_run, test_folder, tmp_path, run_cli, one_core):
    folder, readable, bad = test_folder
    for name in bad:
        (folder / name).unlink()
    (folder / "notes.txt").write_text("not a face")
    (folder / "more").mkdir()
    out = tmp_path / "submission.csv"
    result = run_cli("predict", trained_run.run, "--images", folder, "--out", out, "--no-progress")
    assert result.code == 0, result.err
    assert [r["image_name"] for r in _csv(out)] == sorted(readable)
    # What gets no row is counted and named (the file manager's .DS_Store is not worth a line).
    assert "2 entries of" in result.err and "more/, notes.txt" in result.err and ".DS_Store" not in result.err

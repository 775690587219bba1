"""Helpers for the reliability tests: tiny data folders, tiny training settings, CLI runners.

Everything is sized for a 2-core CPU: a few ORL identities, 16-24 px inputs, mobilenet_v2 without
pretrained weights, fp32 (bf16 is not guaranteed to be bit-identical across runs on every CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facecls import cli

TINY = [
    "model.weights=none",
    "data.input_size=16",
    "data.resize=18",
    "train.epochs=2",
    "train.frozen_epochs=1",
    "train.batch_size=4",
    "speed.precision=fp32",
]


def tiny_args(*extra: str) -> list[str]:
    """``--set`` arguments of the tiny training setup, plus ``extra`` overrides."""
    args = ["--recipe", "mobilenet_v2", "--no-progress"]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


def copy_identities(faces_data: Path, dest: Path, identities: int, images: int) -> Path:
    """DEST/train/<identity>/ with the first ``images`` ORL images of ``identities`` identities."""
    for i in range(1, identities + 1):
        folder = dest / "train" / f"s{i}"
        folder.mkdir(parents=True)
        for j in range(1, images + 1):
            shutil.copy(faces_data / "orl" / f"s{i}" / f"{j}.pgm", folder / f"{j}.pgm")
    return dest


@pytest.fixture(scope="package", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Decoded-image cache in a temporary folder, never the user's; offline; no jemalloc re-exec. Package
    scope: the settings end with this folder's tests instead of leaking into whichever tests run later."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACECLS_CACHE", str(tmp_path_factory.mktemp("facecls-cache")))
        patch.setenv("FACECLS_JEMALLOC", "0")
        patch.setenv("FACECLS_OFFLINE", "1")
        yield


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def run_cli(capsys):
    """Run ``facecls ARGS`` in this process; returns exit code, stdout, stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()  # drop what came before
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def assert_one_line_error(result: CliResult, *needles: str) -> str:
    """Exit code 2, exactly one line on stderr, no traceback; returns the line."""
    assert result.code == 2, result.err
    assert "Traceback" not in result.err
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    assert line.startswith("facecls: error: "), line
    for needle in needles:
        assert needle in line, line
    return line


def pin_to_one_core() -> None:
    """Run on a single core (so torch uses one thread): on a small shared machine, two OpenMP threads
    fighting other processes for two cores are 2-4x slower than one."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def cli_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m facecls ARGS`` in a child process."""
    env = {**os.environ, "FACECLS_JEMALLOC": "0"}
    return subprocess.run(
        [sys.executable, "-m", "facecls", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        preexec_fn=pin_to_one_core,
    )


@pytest.fixture
def one_core():
    """In-process training on one core and one thread (see pin_to_one_core); restored afterwards."""
    import torch

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    pin_to_one_core()
    yield
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


# ---- broken and awkward image files ------------------------------------------------------------------


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def write_bad_files(folder: Path) -> list[str]:
    """Files that cannot be decoded; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(64, 48, 1)).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.jpg").write_bytes(data[:100] + bytes(np.random.default_rng(2).integers(0, 255, 4000, np.uint8)))
    (folder / "zero bytes.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file with an image extension\n")
    return ["truncated.jpg", "corrupt.jpg", "zero bytes.png", "notes.png"]


def write_awkward_images(folder: Path) -> list[str]:
    """Readable images in unusual formats; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(64, 48, 3)).convert("CMYK").save(folder / "cmyk.jpg")
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0], rgba[24:, ..., 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)).save(folder / "grey16.png")
    Image.fromarray(_noise(64, 48, 4)).convert("L").save(folder / "grey.png")
    write_exif_rotated(folder / "exif rotated.jpg")
    Image.new("RGB", (6000, 4000), (30, 120, 200)).save(folder / "huge.jpg", quality=70)
    return ["cmyk.jpg", "rgba.png", "grey16.png", "grey.png", "exif rotated.jpg", "huge.jpg"]


def write_exif_rotated(path: Path) -> None:
    """Stored 60 wide x 40 high, top half red, bottom half blue, EXIF orientation 6 (display rotated 90
    degrees clockwise): upright it is 40 wide x 60 high, left half blue, right half red."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:20] = (255, 0, 0)
    stored[20:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


# ---- a messy data folder and a run trained on it (shared by the tests of this folder) ------------------


@dataclass
class MessyData:
    root: Path
    readable: set[str]
    """Paths (relative to root) of every image that decodes."""
    unreadable: set[str]
    skipped_other: set[str]
    """Left out for other reasons: hidden, not an image, empty identity folder, stray file."""


def build_messy_data(faces_data: Path, root: Path) -> MessyData:
    """Real ORL faces plus every kind of awkward file a user's folder tends to hold."""
    train = root / "train"
    copy_identities(faces_data, root, identities=3, images=6)
    odd_names = train / "José Ñúñez"  # non-ASCII and a space in the identity, spaces in file names
    odd_names.mkdir()
    for j in range(1, 7):
        shutil.copy(faces_data / "orl" / "s4" / f"{j}.pgm", odd_names / f"photo één {j}.pgm")
    formats = train / "s5"  # unusual but readable files
    formats.mkdir()
    for j in range(1, 5):
        shutil.copy(faces_data / "orl" / "s5" / f"{j}.pgm", formats / f"{j}.pgm")
    awkward = write_awkward_images(formats)
    latin1 = os.fsdecode(b"caf\xe9.pgm")  # a Latin-1 name from an old archive: not valid UTF-8
    shutil.copy(faces_data / "orl" / "s5" / "5.pgm", formats / latin1)
    awkward.append(latin1)
    broken = train / "s6"  # files that cannot be decoded, and files that are no images
    broken.mkdir()
    for j in range(1, 5):
        shutil.copy(faces_data / "orl" / "s6" / f"{j}.pgm", broken / f"{j}.pgm")
    bad = write_bad_files(broken)
    (broken / "notes.txt").write_text("not an image\n")
    (broken / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (broken / "._1.pgm").write_bytes(b"\0\5\26\7 AppleDouble")
    for name, count in (("solo", 1), ("duo", 2)):  # identities with one and two images
        (train / name).mkdir()
        for j in range(1, count + 1):
            shutil.copy(faces_data / "orl" / "s7" / f"{j}.pgm", train / name / f"{j}.pgm")
    (train / "empty_person").mkdir()
    (train / ".hidden_folder").mkdir()
    shutil.copy(faces_data / "orl" / "s8" / "1.pgm", train / ".hidden_folder" / "1.pgm")
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "readme.md").write_text("stray file\n")

    readable = {f"train/s{i}/{j}.pgm" for i in (1, 2, 3) for j in range(1, 7)}
    readable |= {f"train/José Ñúñez/photo één {j}.pgm" for j in range(1, 7)}
    readable |= {f"train/s5/{j}.pgm" for j in range(1, 5)} | {f"train/s5/{n}" for n in awkward}
    readable |= {f"train/s6/{j}.pgm" for j in range(1, 5)} | {"train/solo/1.pgm", "train/duo/1.pgm", "train/duo/2.pgm"}
    skipped_other = {
        "train/s6/notes.txt",
        "train/s6/.DS_Store",
        "train/s6/._1.pgm",
        "train/empty_person/",
        "train/.hidden_folder/",
        "train/.DS_Store",
        "train/readme.md",
    }
    return MessyData(root, readable, {f"train/s6/{n}" for n in bad}, skipped_other)


@pytest.fixture(scope="session")
def messy_data(faces_data, tmp_path_factory) -> MessyData:
    return build_messy_data(faces_data, tmp_path_factory.mktemp("session_messy") / "data")


@dataclass
class TrainedRun:
    run: Path
    data: MessyData
    log: str


@pytest.fixture(scope="session")
def trained_run(messy_data, tmp_path_factory) -> TrainedRun:
    """A finished tiny run (2 epochs) trained on the messy data folder, in a child process."""
    run = tmp_path_factory.mktemp("session_runs") / "messy"
    result = cli_subprocess("train", "--data", messy_data.root, "--out", run, *tiny_args("speed.workers=0"))
    assert result.returncode == 0, result.stderr
    return TrainedRun(run, messy_data, result.stderr)


def copy_run(run: Path, dest: Path, *, unfinished: bool = False) -> Path:
    """A copy of a run folder to change; ``unfinished`` drops the completed mark from run.json."""
    shutil.copytree(run, dest)
    if unfinished:
        info = json.loads((dest / "run.json").read_text())
        info.pop("completed", None)
        (dest / "run.json").write_text(json.dumps(info))
    return dest

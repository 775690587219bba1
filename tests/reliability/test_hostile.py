"""Hostile folders and real operations (issue 18): the run-folder lock, SIGTERM, full disks inside
torch.save, permission errors, damaged run files, FIFOs and symlinks, orphaned workers and temp folders,
non-UTF-8 names, decode memory bounds, and the smaller one-line errors. One section per numbered point."""

from __future__ import annotations

import codecs
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facecls.commands.prepare import list_inputs
from facecls.commands.score import score_submission
from facecls.core import atomic, runs
from facecls.core import checkpoint as checkpoint_module
from facecls.core.checkpoint import load_checkpoint, save_checkpoint
from facecls.core.errors import FaceclsError
from facecls.data import images as images_module
from facecls.data.images import DecodedCache, UnreadableImage, decode_bytes, load_image, remove_dead_builders
from facecls.data.scan import escape_name, list_flat_images, scan_identity_folders, unescape_name

from .conftest import assert_one_line_error, copy_identities, copy_run, pin_to_one_core, tiny_args

# ---- 1. the run-folder lock ---------------------------------------------------------------------------


def test_second_writer_gets_one_line_naming_the_holder(run_cli, faces_data, tmp_path):
    data = copy_identities(faces_data, tmp_path / "data", identities=2, images=4)
    run = tmp_path / "run"
    run.mkdir()
    with runs.RunLock(run):
        result = run_cli("train", "--data", data, "--out", run, *tiny_args())
        assert_one_line_error(result, "in use by another facecls process", f"PID {os.getpid()}")
        result = run_cli("train", "--resume", run)
        assert_one_line_error(result, "in use", f"PID {os.getpid()}")
    assert not (run / "config.yaml").exists()  # the refused writer wrote nothing


def test_lock_of_a_killed_process_is_released_by_the_kernel(tmp_path):
    code = (
        "import sys, time; from facecls.core.runs import RunLock; lock = RunLock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(FaceclsError, match=f"PID {proc.pid}"):
        runs.RunLock(tmp_path)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    runs.RunLock(tmp_path).release()  # no stale lock: the kernel dropped it with the process


def test_readers_never_need_the_lock(run_cli, trained_run, tmp_path):
    run = copy_run(trained_run.run, tmp_path / "run")
    with runs.RunLock(run):
        result = run_cli("evaluate", run, "--split", "val")
        assert result.code == 0, result.err


# ---- 4. SIGTERM / SIGINT -------------------------------------------------------------------------------


def _start(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "FACECLS_JEMALLOC": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "facecls", *map(str, args)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=pin_to_one_core,
        start_new_session=True,  # its own process group: a scheduler's signal reaches every process of it
    )


def _group_gone(pgid: int, wait: float = 30) -> bool:
    """Poll until no process of group ``pgid`` is left (workers die with their parent, asynchronously)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize(
    "sig,code",
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],  # Ctrl-C: also test_resume
)
def test_stop_signal_to_the_whole_group_saves_and_says_how_to_resume(faces_data, tmp_path, sig, code):
    data = copy_identities(faces_data, tmp_path / "data", identities=4, images=6)
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, *tiny_args("train.checkpoint_every=1", "speed.workers=1")]
    with tempfile.TemporaryFile("w+") as log:
        proc = _start(args, log)
        deadline = time.monotonic() + 120
        while not (run / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, sig)  # main process and loader worker alike, as SLURM and Ctrl-C do
        assert proc.wait(timeout=120) == code
        log.seek(0)
        out = log.read()
    assert "Traceback" not in out and "killed by signal" not in out, out
    final = [line for line in out.splitlines() if line.startswith("facecls:")]
    assert len(final) == 1 and "--resume" in final[0] and signal.Signals(sig).name in final[0], out
    assert _group_gone(proc.pid), "a loader worker outlived the stopped run"
    load_checkpoint(run / "last.ckpt")
    resumed = subprocess.run(
        [sys.executable, "-m", "facecls", "train", "--resume", run, "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "FACECLS_JEMALLOC": "0"},
        preexec_fn=pin_to_one_core,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert runs.read_run_info(run)["completed"] is True


_SIGTERM_OUTSIDE_LOOP = """
import os, signal, sys, time
from pathlib import Path
from facecls.runtime.distributed import DistEnv
from facecls.commands.train import _sigterm_exits_at_once
run = Path(sys.argv[1])
with _sigterm_exits_at_once(run, DistEnv()):
    os.kill(os.getpid(), signal.SIGTERM)  # as during the data scan, the decoding or the final evaluation
    time.sleep(60)
"""


@pytest.mark.parametrize("started", [True, False])
def test_sigterm_outside_the_training_loop_exits_143_in_one_line(tmp_path, started):
    if started:
        (tmp_path / "config.yaml").write_text("name: x\n")
    done = subprocess.run(
        [sys.executable, "-c", _SIGTERM_OUTSIDE_LOOP, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 143, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("facecls: stopped (SIGTERM)"), done.stderr
    assert ("--resume" in lines[0]) == started


# ---- 5. a full disk inside torch.save ------------------------------------------------------------------


TORCH_ENOSPC = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch.save's text


@pytest.mark.parametrize("chained", [True, False])
def test_enospc_wrapped_by_torch_save_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch, chained):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"model": {"w": torch.ones(1000)}, "class_names": ["a"], "epoch": 1}, path)

    def save_on_full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        if chained:  # torch's zip writer keeps the OSError as the context
            raise RuntimeError(TORCH_ENOSPC) from OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError(TORCH_ENOSPC)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_on_full_disk)
    with pytest.raises(FaceclsError) as info:
        save_checkpoint({"model": {"w": torch.zeros(1000)}, "class_names": ["a"], "epoch": 2}, path)
    message = str(info.value)
    assert "\n" not in message and "previous checkpoint is intact" in message and str(path) in message
    assert ("disk full" in message) == chained
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_other_runtime_errors_of_torch_save_are_not_hidden(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("a bug, not a disk")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint({"model": {}, "class_names": ["a"]}, tmp_path / "last.ckpt")
    assert not list(tmp_path.iterdir())


# ---- 7. permission denied ------------------------------------------------------------------------------


@pytest.fixture
def deny_writes(monkeypatch):
    """``deny(folder)``: nothing can be created in ``folder`` (chmod 555; as root, which chmod does not
    stop, the calls that create files and folders are made to fail as the kernel would)."""
    denied: list[Path] = []

    def inside(path) -> bool:
        path = Path(path).resolve()
        return any(path == d or d in path.parents for d in denied)

    def error(path):
        return PermissionError(errno.EACCES, "Permission denied", str(path))

    real_mkstemp, real_access, real_mkdir = tempfile.mkstemp, os.access, Path.mkdir

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            raise error(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK and inside(path) else real_access(path, mode, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        if not self.exists() and inside(self.parent):
            raise error(self)
        return real_mkdir(self, *args, **kwargs)

    if os.geteuid() == 0:
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(Path, "mkdir", mkdir)

    def deny(folder: Path) -> Path:
        denied.append(Path(folder).resolve())
        os.chmod(folder, 0o555)
        return folder

    yield deny
    for folder in denied:
        os.chmod(folder, 0o755)


def test_permission_denied_is_one_line_everywhere(run_cli, trained_run, faces_data, tmp_path, deny_writes):
    run = deny_writes(copy_run(trained_run.run, tmp_path / "run"))
    assert_one_line_error(run_cli("evaluate", run), "Permission denied")
    images = trained_run.data.root / "train" / "s1"
    (tmp_path / "ro").mkdir()
    out_dir = deny_writes(tmp_path / "ro")
    assert_one_line_error(run_cli("predict", run, "--images", images, "--out", out_dir / "s.csv", "--no-progress"))
    solution = tmp_path / "solution.csv"
    solution.write_text("image_name,label\n1.pgm,s1\n")
    submission = tmp_path / "submission.csv"
    submission.write_text("image_name,label\n1.pgm,s1\n")
    assert_one_line_error(run_cli("score", submission, "--solution", solution, "--run", run), "Permission denied")
    unfinished = copy_run(trained_run.run, tmp_path / "unfinished", unfinished=True)
    assert_one_line_error(run_cli("train", "--resume", deny_writes(unfinished)), "not writable")
    data = copy_identities(faces_data, tmp_path / "data", identities=2, images=4)
    (tmp_path / "parent").mkdir()
    parent = deny_writes(tmp_path / "parent")
    assert_one_line_error(run_cli("train", "--data", data, "--out", parent / "run", *tiny_args()), "cannot create")


# ---- 8. damaged run files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["classes.json", "config.yaml", "run.json"])
@pytest.mark.parametrize("damage", ["missing", "empty", "garbage", "binary"])
def test_damaged_run_file_is_one_line(run_cli, trained_run, tmp_path, name, damage):
    run = copy_run(trained_run.run, tmp_path / "run")
    path = run / name
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(
            {"empty": b"", "garbage": b"{{[: not json or yaml ]]\n\t- x: [", "binary": b"\xff\xfe\0\x01"}[damage]
        )
    assert_one_line_error(run_cli("evaluate", run), name)
    assert_one_line_error(run_cli("predict", run, "--images", trained_run.data.root / "train" / "s1"), name)


def test_truncated_last_checkpoint_says_best_is_intact(run_cli, trained_run, tmp_path):
    run = copy_run(trained_run.run, tmp_path / "run", unfinished=True)
    data = (run / "last.ckpt").read_bytes()
    (run / "last.ckpt").write_bytes(data[: len(data) // 2])
    line = assert_one_line_error(run_cli("train", "--resume", run), "last.ckpt", "truncated or corrupt")
    assert "best.ckpt (epoch" in line and "is intact" in line


def test_random_garbage_checkpoint_is_not_called_code(run_cli, trained_run, tmp_path):
    run = copy_run(trained_run.run, tmp_path / "run")
    for seed in range(3):
        (run / "best.ckpt").write_bytes(np.random.default_rng(seed).bytes(5000))
        line = assert_one_line_error(run_cli("evaluate", run), "best.ckpt")
        assert "could run code" not in line and ("random" in line or "corrupt" in line), line


# ---- 2. only regular files are opened; nothing blocks ----------------------------------------------------


def _returns_within(fn, seconds: float = 60):
    """Run ``fn`` in a thread: a blocked open() would hang the test suite, this fails it instead."""
    box = {}

    def call() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked on a special file"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_fifo_is_skipped_and_listed_never_opened(tmp_path, faces_data):
    data = copy_identities(faces_data, tmp_path / "data", identities=1, images=2)
    os.mkfifo(data / "train" / "s1" / "f.jpg")
    samples, skipped = _returns_within(lambda: scan_identity_folders(data, "train"))
    assert [s.path for s in samples] == ["train/s1/1.pgm", "train/s1/2.pgm"]
    assert any(s.path == "train/s1/f.jpg" and "FIFO" in s.reason for s in skipped)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(faces_data / "orl" / "s1" / "1.pgm", flat / "1.pgm")
    os.mkfifo(flat / "g.jpg")
    found, skipped = _returns_within(lambda: list_flat_images(flat))
    assert [p.name for p in found] == ["1.pgm"] and any("FIFO" in s.reason for s in skipped)
    with pytest.raises(UnreadableImage, match="FIFO"):
        _returns_within(lambda: load_image(flat / "g.jpg", 16))
    with pytest.raises(UnreadableImage, match="folder"):
        load_image(flat, 16)


def test_predict_with_a_fifo_in_the_folder_finishes(run_cli, trained_run, tmp_path, faces_data, one_core):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(faces_data / "orl" / "s1" / "1.pgm", flat / "1.pgm")
    os.mkfifo(flat / "f.jpg")
    out = tmp_path / "s.csv"
    result = _returns_within(
        lambda: run_cli("predict", trained_run.run, "--images", flat, "--out", out, "--no-progress")
    )
    assert result.code == 0, result.err
    assert out.read_text().splitlines()[1].startswith("1.pgm,")


# ---- 6. dangling symlinks, symlink loops, symlinked folders -------------------------------------------


def test_dangling_symlinks_and_loops_are_listed_and_hashed(tmp_path, faces_data):
    data = copy_identities(faces_data, tmp_path / "data", identities=1, images=2)
    s1 = data / "train" / "s1"
    (s1 / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (s1 / "loop.jpg").symlink_to(s1 / "loop.jpg")
    (s1 / "sub").symlink_to(s1, target_is_directory=True)  # a folder loop
    (s1 / "ok.pgm").symlink_to(s1 / "1.pgm")  # a symlink to a file is a file
    samples, skipped = scan_identity_folders(data, "train")
    assert [s.path for s in samples] == ["train/s1/1.pgm", "train/s1/2.pgm", "train/s1/ok.pgm"]
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["train/s1/gone.jpg"] == "dangling symlink"
    assert reasons["train/s1/loop.jpg"] == "symlink loop"
    assert "symlinked folder" in reasons["train/s1/sub/"]
    DecodedCache.key([s1 / "gone.jpg", s1 / "loop.jpg", s1 / "1.pgm"], 16)  # no FileNotFoundError, no ELOOP


def test_prepare_follows_symlinked_identity_folders_and_lists_nested_ones(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "bob"
    elsewhere.mkdir(parents=True)
    (elsewhere / "1.jpg").write_bytes(b"x")
    (elsewhere / "nested").symlink_to(elsewhere, target_is_directory=True)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "bob").symlink_to(elsewhere, target_is_directory=True)
    skipped: list[Path] = []
    assert [p.as_posix() for p in list_inputs(raw, skipped)] == ["bob/1.jpg"]
    assert [p.as_posix() for p in skipped] == ["bob/nested"]


# ---- 3. workers die with their parent; stale cache build folders go -------------------------------------

_POOL_CHILD = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from facecls.data.images import die_with_parent
pool = ProcessPoolExecutor(1, initializer=die_with_parent)
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 600)
time.sleep(600)
"""


def test_decoding_workers_die_with_a_killed_parent():
    proc = subprocess.Popen([sys.executable, "-c", _POOL_CHILD], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    proc.stdout.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        if _is_zombie(worker):  # dead, waiting for init to reap it
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the decoding worker outlived its killed parent")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


def test_stale_cache_build_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"0123abcd-16px.tmp{dead.pid}"
    live = tmp_path / f"4567abcd-16px.tmp{os.getpid()}"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"x")
    assert remove_dead_builders(tmp_path) == [stale]
    assert live.exists() and not stale.exists()


# ---- 9. non-UTF-8 names ----------------------------------------------------------------------------------


def test_name_escaping_is_utf8_and_reversible():
    for raw in (b"caf\xe9.jpg", b"\xff\xfe.png", "visage n°1.pgm".encode(), b"plain.jpg"):
        name = os.fsdecode(raw)
        text = escape_name(name)
        text.encode("utf-8")  # strict: no surrogates left
        assert unescape_name(text) == name and os.fsencode(unescape_name(text)) == raw
    assert escape_name(os.fsdecode(b"caf\xe9.jpg")) == "caf\\xe9.jpg"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "latin-1", "utf-8-sig"])
def test_score_reads_utf16_and_latin1_submissions(tmp_path, encoding):
    solution = tmp_path / "solution.csv"
    solution.write_text("image_name,label\ncafé.jpg,José\n b.jpg,x\nb.jpg,y\n", encoding="utf-8")
    submission = tmp_path / "submission.csv"
    text = "image_name,label\r\ncafé.jpg,José\r\n b.jpg,x\r\nb.jpg,z\r\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    submission.write_bytes(data)
    score = score_submission(submission, solution)  # ' b.jpg' and 'b.jpg' are two images
    assert (score.correct, score.total) == (2, 3)


def test_score_refuses_binary_in_one_line(run_cli, tmp_path):
    solution = tmp_path / "solution.csv"
    solution.write_text("image_name,label\na.jpg,x\n")
    binary = tmp_path / "sub.csv"
    binary.write_bytes(b"image_name,label\n\xff\x00\x01")
    assert_one_line_error(run_cli("score", binary, "--solution", solution), "not a text file")


# ---- 10. decode memory bound --------------------------------------------------------------------------


def test_decode_memory_is_bounded_from_the_header(tmp_path, monkeypatch):
    # The 58 KB 1-bit 22000 x 22000 PNG: 1 byte stored + 4 bytes RGB per pixel = 2.4 GB > 1 GiB.
    assert decode_bytes("1", 22000, 22000) > images_module.MAX_DECODE_BYTES
    assert decode_bytes("RGB", 4000, 3000) < images_module.MAX_DECODE_BYTES  # a 12 Mpx photo is fine
    path = tmp_path / "bilevel.png"
    Image.new("1", (2000, 2000)).save(path)  # 5 bytes/pixel decoded: 20 MB
    monkeypatch.setattr(images_module, "MAX_DECODE_BYTES", 8 * 2**20)
    with pytest.raises(UnreadableImage, match="too large to decode"):
        load_image(path, 64)


def test_a_long_strip_is_resized_by_its_kept_region(tmp_path):
    path = tmp_path / "strip.png"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (1, 80))[:, :20000]).save(path)  # 1 x 20000
    array = load_image(path, 256)  # whole: 256 x 5,120,000 x 4 bytes = 5 GB; by region: 256 x 256
    assert array.shape == (256, 256, 3)
    # a wide but ordinary image resizes exactly as before (resize, then centre crop)
    wide = np.random.default_rng(0).integers(0, 255, (40, 100, 3), np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    expected = np.array(
        Image.fromarray(wide).resize((80, 32), Image.Resampling.BILINEAR, reducing_gap=None).crop((24, 0, 56, 32))
    )
    np.testing.assert_array_equal(load_image(tmp_path / "wide.png", 32), expected)


# ---- 11. the smaller items ----------------------------------------------------------------------------


def test_bad_numbers_and_devices_are_one_line(run_cli, trained_run, messy_data, tmp_path):
    data, run = messy_data.root, trained_run.run
    for value in ("nan", "inf", "-1", "0"):
        assert_one_line_error(
            run_cli("train", "--data", data, "--out", tmp_path / "r", "--epochs-scale", value, *tiny_args()),
            "--epochs-scale",
        )
    for value in ("0", "-1"):
        assert_one_line_error(
            run_cli("train", "--data", data, "--out", tmp_path / "r", "--max-steps", value, *tiny_args()), "--max-steps"
        )
        assert_one_line_error(run_cli("evaluate", run, "--batch-size", value), "--batch-size")
        assert_one_line_error(
            run_cli("predict", run, "--images", data / "train" / "s1", "--batch-size", value), "--batch-size"
        )
    assert_one_line_error(
        run_cli("train", "--data", data, "--out", tmp_path / "r", "--device", "tpu", *tiny_args()), "unknown device"
    )
    if not torch.cuda.is_available():
        assert_one_line_error(
            run_cli("train", "--data", data, "--out", tmp_path / "r", "--device", "cuda", *tiny_args()), "no CUDA GPU"
        )
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_predict_out_a_folder_fails_before_predicting(run_cli, trained_run, tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    result = run_cli("predict", trained_run.run, "--images", trained_run.data.root / "train" / "s1", "--out", folder)
    assert_one_line_error(result, "is a folder")
    assert not list(tmp_path.glob(".*tmp*")) and not list(folder.iterdir())


def test_header_only_solution_is_refused(run_cli, tmp_path):
    solution = tmp_path / "solution.csv"
    solution.write_text("image_name,label\n")
    assert_one_line_error(run_cli("score", solution, "--solution", solution), "no rows")


def test_unreadable_identity_folder_and_all_unreadable_images(run_cli, faces_data, tmp_path, monkeypatch, one_core):
    data = copy_identities(faces_data, tmp_path / "data", identities=2, images=3)
    real_access = os.access
    locked = (data / "train" / "s2").resolve()
    monkeypatch.setattr(
        os, "access", lambda p, m, *a, **k: False if Path(p).resolve() == locked else real_access(p, m, *a, **k)
    )
    _, skipped = scan_identity_folders(data, "train")
    assert any(s.path == "train/s2/" and "permission denied" in s.reason for s in skipped)
    monkeypatch.undo()
    for image in (data / "train").rglob("*.pgm"):
        image.write_bytes(b"not an image")
    result = run_cli("train", "--data", data, "--out", tmp_path / "run", *tiny_args("speed.workers=0"))
    line = [x for x in result.error_lines if x.startswith("facecls: error:")]
    assert result.code == 2 and len(line) == 1 and "no readable training images" in line[0], result.err


def test_failed_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "per_class_val.csv"
    target.write_text("old\n")
    with pytest.raises(OSError), atomic.atomic_write(target) as handle:
        handle.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_prepare_never_opens_a_fifo(tmp_path):
    from facecls.commands.prepare import prepare_folder

    (tmp_path / "raw" / "alice").mkdir(parents=True)
    os.mkfifo(tmp_path / "raw" / "alice" / "f.jpg")
    summary = _returns_within(lambda: prepare_folder(tmp_path / "raw", tmp_path / "out", progress=False, workers=1))
    assert summary.aligned == 0
    report = (tmp_path / "out" / "prepare_report.csv").read_text()
    assert "f.jpg" in report and "FIFO" in report

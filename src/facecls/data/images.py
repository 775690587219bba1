"""Decoding: any image file -> RGB uint8 array at a fixed square size; the decoded-image cache."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import signal
import stat
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from facecls.core.atomic import write_text
from facecls.data.scan import describe_file_kind

# Very large images are fine to read (we only downscale); the guard is for decompression bombs.
Image.MAX_IMAGE_PIXELS = 250_000_000


class UnreadableImage(Exception):
    """The file could not be decoded as an image."""


# Memory one decode may take: the decoded image in Pillow's storage plus its RGB copy. The pixel-count
# guard above misses small files with huge decoded sizes (a 58 KB 1-bit 22000 x 22000 PNG is 2.4 GB
# decoded and converted); 1 GiB holds a 64-megapixel RGB photo twice over.
MAX_DECODE_BYTES = 1 << 30

# Bytes per pixel in Pillow's own storage (1-bit and palette images take a byte per pixel, RGB four).
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "PA": 4, "La": 4}


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Memory a decode to RGB takes: the image as stored by Pillow, plus the RGB (4 bytes/px) copy,
    plus a float64 copy for 16/32-bit integer and float images (see _to_rgb)."""
    per_pixel = _STORAGE_BYTES.get(mode, 4) + 4
    if mode.startswith("I") or mode == "F":
        per_pixel += 8
    return per_pixel * width * height


def _open_regular_file(path: Path | str):
    """A binary handle on ``path`` if it is a regular file. Opened non-blocking, so a FIFO named
    ``f.jpg`` (or a device, a socket) is refused at once instead of blocking the command forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableImage(f"{type(exc).__name__}: {exc.strerror or exc}") from None
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        raise UnreadableImage(f"not a regular file ({describe_file_kind(kind)})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def open_rgb(path: Path | str, min_size: int | None = None) -> Image.Image:
    """Open any supported image as RGB: EXIF rotation applied; L, LA, P, RGBA, CMYK, I;16 converted.

    With ``min_size``, a JPEG is decoded at the smallest of its 1/2, 1/4, 1/8 scales (libjpeg's DCT scaling)
    whose sides are both still at least ``min_size``: a 1200 px photo wanted at 224 px decodes at 300 px,
    9x faster than decoding it whole (measured 1.3 vs 11.9 ms), and is then resized as usual.

    Only regular files are opened, and an image whose decode would take more than MAX_DECODE_BYTES
    (after the JPEG scale reduction) is refused from its header, before anything is decoded."""
    handle = _open_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with handle, Image.open(handle) as img:
                if min_size is not None and img.format == "JPEG":
                    img.draft("RGB", (min_size, min_size))  # must come before load() to take effect
                needed = decode_bytes(img.mode, *img.size)
                if needed > MAX_DECODE_BYTES:
                    raise UnreadableImage(
                        f"too large to decode: {img.size[0]} x {img.size[1]} {img.mode} needs "
                        f"{needed / 2**30:.1f} GiB (limit {MAX_DECODE_BYTES / 2**30:.0f} GiB)"
                    )
                img.load()
                return to_rgb(img)
    except UnreadableImage:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders of corrupt files raise anything (EOFError, struct.error, ...)
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def check_decodes(path: Path | str) -> None:
    """Decode ``path`` fully but cheaply (JPEGs at 1/8 scale, which still reads the whole stream) and
    convert it to RGB, so a truncated or corrupt file is found up front; raises UnreadableImage."""
    open_rgb(path, min_size=1)


def unreadable_files(paths: list[Path]) -> list[int]:
    """Indices of the files that do not decode (`check_decodes` of each, in order): a command checks its
    inputs up front with it, so a bad file fails the command before any work is done."""
    bad = []
    for i, path in enumerate(paths):
        try:
            check_decodes(path)
        except UnreadableImage:
            bad.append(i)
    return bad


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright RGB version of a decoded Pillow image of any mode: the one conversion every reader uses
    (training, evaluation, ``prepare``, ``predict --detect``), so one file gives the same pixels everywhere.

    Transparent pixels go onto black; 16-bit greyscale is scaled by 65535 (its full range, so a dark
    16-bit image stays dark); plain 32-bit integers by 65535 when they exceed 255; floats are clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # I;16 is 16-bit by definition (a dark 16-bit image must stay dark); plain I holds any integers.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop to ``size`` x ``size`` (uint8 HWC)."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if max(new_w, new_h) > 4 * size:
        # A very long strip (1 x 20000 px): resizing it whole would allocate size x 5 million pixels
        # only to crop them away. Resize just the source region that the centre crop keeps.
        left, top = (new_w - size) // 2 / (new_w / w), (new_h - size) // 2 / (new_h / h)
        box = (left, top, left + size * w / new_w, top + size * h / new_h)
        return np.array(img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=None), np.uint8)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)


def load_image(path: Path | str, size: int) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 ``size`` x ``size`` x 3 array (raises UnreadableImage)."""
    return resize_square(open_rgb(path, min_size=size), size)


def _fill_chunk(args: tuple[str, int, list[tuple[int, str]], int]) -> list[tuple[int, str]]:
    array_path, size, items, total = args
    array = np.lib.format.open_memmap(array_path, mode="r+")
    failures = []
    for index, path in items:
        try:
            array[index] = load_image(path, size)
        except UnreadableImage as exc:
            failures.append((index, str(exc)))
    array.flush()
    return failures


def die_with_parent() -> None:
    """In a worker process: be killed (SIGKILL) when the process that started it dies, however it dies,
    so no decoding worker lives on parentless holding memory (Linux prctl PR_SET_PDEATHSIG; elsewhere
    the pools' own parent checks remain)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def init_pool_worker() -> None:
    """Initializer of the decoding pools' (forked) workers: SIGTERM ends them as usual (not the main
    process's handler, inherited through fork), and they die with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


def remove_dead_builders(root: Path) -> list[Path]:
    """Remove ``<key>.tmp<PID>`` cache folders whose building process is gone (killed mid-build)."""
    removed = []
    for tmp in root.glob("*.tmp*") if root.is_dir() else []:
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class DecodedCache:
    """A memory-mapped ``N x S x S x 3`` uint8 array of decoded images, built once, reused by key.

    The key covers every file's path, size and modification time and the target size, so a changed
    file gives a new cache. Building happens in a temporary folder renamed into place at the end.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.images = np.load(self.folder / "images.npy", mmap_mode="r")
        self.valid = np.load(self.folder / "valid.npy")
        self.errors: dict[int, str] = {
            int(k): v for k, v in json.loads((self.folder / "errors.json").read_text()).items()
        }

    def __getstate__(self) -> dict:
        # Pickled into DataLoader workers by folder, never by value (spawned workers reopen the map).
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    @staticmethod
    def key(paths: list[Path], size: int) -> str:
        # The decoder's version: change it whenever decoding gives other pixels, so no cache outlives them.
        digest = hashlib.sha256(f"v2 {size}\n".encode())
        for path in paths:
            try:
                st = os.stat(path)
                entry = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n"
            except OSError as exc:  # a dangling symlink, a loop: the decode lists it as unreadable
                entry = f"{os.path.abspath(path)}\0{exc.errno}\n"
            digest.update(entry.encode("utf-8", "surrogateescape"))  # file names need not be UTF-8
        return digest.hexdigest()[:24]

    @classmethod
    def build(cls, root: Path, paths: list[Path], size: int, workers: int = 1, progress=None) -> DecodedCache:
        """Return the cache for ``paths`` at ``size``, building it under ``root`` if needed."""
        remove_dead_builders(Path(root))
        folder = Path(root) / f"{cls.key(paths, size)}-{size}px"
        if (folder / "valid.npy").is_file():
            return cls(folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = len(paths)
        np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        items = [(i, str(p)) for i, p in enumerate(paths)]
        chunk = max(1, min(256, n // max(1, workers * 4) or 1))
        jobs = [(str(tmp / "images.npy"), size, items[i : i + chunk], n) for i in range(0, n, chunk)]
        failures: list[tuple[int, str]] = []
        if workers > 1 and n > chunk:
            with ProcessPoolExecutor(workers, initializer=init_pool_worker) as pool:
                for job, result in zip(jobs, pool.map(_fill_chunk, jobs), strict=True):
                    failures += result
                    if progress:
                        progress(len(job[2]))
        else:
            for job in jobs:
                failures += _fill_chunk(job)
                if progress:
                    progress(len(job[2]))
        valid = np.ones(n, dtype=bool)
        for index, _ in failures:
            valid[index] = False
        np.save(tmp / "valid.npy", valid)
        write_text(tmp / "errors.json", json.dumps({str(i): msg for i, msg in failures}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(folder)

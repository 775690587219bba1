"""Folders -> samples: find identity folders and image files, and account for everything left out."""

from __future__ import annotations

import csv
import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from facecls.core.atomic import atomic_write
from facecls.core.errors import FaceclsError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Sample:
    """One labelled image: its path relative to the data root and its identity (folder name)."""

    path: str
    identity: str


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not used, and why."""

    path: str
    reason: str


def is_hidden(name: str) -> bool:
    """Dot files and folders: hidden files, macOS resource forks (.DS_Store, ._IMG_1.jpg), .git."""
    return name.startswith(".")


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def describe_file_kind(kind: int) -> str:
    """``stat.S_IFMT(mode)`` in words."""
    return _FILE_KINDS.get(kind, "a special file")


def not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` cannot be opened as an image file (a dangling symlink, a symlink loop, a FIFO, a
    device, a socket, a folder), or None for a regular file (or a symlink to one). Never opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "dangling symlink" if os.path.islink(path) else "vanished while scanning"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"cannot read it ({exc.strerror or exc})"
    kind = stat.S_IFMT(st.st_mode)
    return None if kind == stat.S_IFREG else f"not a regular file ({describe_file_kind(kind)})"


def escape_name(name: str) -> str:
    """A file name as valid UTF-8 text, for CSV files and messages. A name that is valid UTF-8 stays as
    it is; in one that is not (Python holds its bytes as surrogates), each byte that is not part of
    valid UTF-8 is written as ``\\xNN`` (``caf\\xe9.jpg`` for Latin-1 ``café.jpg``). ``unescape_name``
    gives the name back (exactly, unless the valid part itself holds a literal ``\\xNN``)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unescape_name(text: str) -> str:
    """The file name that ``escape_name`` wrote as ``text``."""
    if "\\x" not in text:
        return text
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return raw.decode("utf-8", "surrogateescape")


# What `facecls prepare` writes beside the crops it aligns: its report and its crop settings, read by training,
# export and the report page. They are not data, so a scan neither takes them nor lists them as left out.
PREPARE_REPORT = "prepare_report.csv"
PREPARE_CONFIG = "prepare_config.json"


def is_prepare_output(entry: Path) -> bool:
    return entry.name in (PREPARE_REPORT, PREPARE_CONFIG) and entry.is_file()


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def scan_identity_folders(root: Path, subdir: str) -> tuple[list[Sample], list[SkippedFile]]:
    """All images under ``root/subdir/<identity>/``, sorted; plus every file that is not used.

    Files without an image extension, hidden files and stray files at the top level are listed as
    skipped (never silently dropped); `facecls prepare`'s own two files at the top are not data.
    Readability is checked later, when images are decoded.
    """
    base = root / subdir
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    for entry in sorted(base.iterdir(), key=lambda p: p.name):
        rel = f"{subdir}/{entry.name}"
        if is_prepare_output(entry):
            continue
        if not entry.is_dir():
            why = not_a_regular_file(entry)
            where = "not inside an identity folder"
            skipped.append(SkippedFile(rel, f"{why}, {where}" if why else where))
            continue
        if is_hidden(entry.name):
            skipped.append(SkippedFile(rel + "/", "hidden folder"))
            continue
        if not os.access(entry, os.R_OK | os.X_OK):
            why = "identity folder not readable (permission denied; identity left out)"
            skipped.append(SkippedFile(rel + "/", why))
            continue
        found = 0
        for file in sorted(entry.rglob("*"), key=lambda p: p.as_posix()):
            file_rel = f"{rel}/{file.relative_to(entry).as_posix()}"
            if file.is_dir():
                if file.is_symlink():  # rglob does not descend into it (it could loop back)
                    skipped.append(SkippedFile(file_rel + "/", "symlinked folder inside an identity (not followed)"))
                continue
            why = None if is_hidden(file.name) else not_a_regular_file(file)
            if is_hidden(file.name):
                skipped.append(SkippedFile(file_rel, "hidden file"))
            elif why:
                skipped.append(SkippedFile(file_rel, why))
            elif file.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(SkippedFile(file_rel, f"not an image extension ({file.suffix or 'none'})"))
            else:
                samples.append(Sample(file_rel, entry.name))
                found += 1
        if found == 0:
            skipped.append(SkippedFile(rel + "/", "identity folder without images (identity left out)"))
    return samples, skipped


def find_labelled_images(root: Path) -> tuple[list[Sample], list[Sample], list[SkippedFile]]:
    """Scan ``root/train`` (and ``root/val`` when it exists).

    Returns (train_samples, val_samples, skipped). Raises FaceclsError when the layout is wrong.
    """
    root = Path(root)
    if not root.is_dir():
        raise FaceclsError(f"data folder {root} does not exist")
    if not (root / "train").is_dir():
        raise FaceclsError(
            f"{root} has no train/ folder: expected {root}/train/<identity>/<image> "
            "(and optionally val/<identity>/... and a flat test/)"
        )
    train, skipped = scan_identity_folders(root, "train")
    val: list[Sample] = []
    if (root / "val").is_dir():
        val, val_skipped = scan_identity_folders(root, "val")
        skipped += val_skipped
    if not train:
        raise FaceclsError(f"no images found under {root}/train/<identity>/ (extensions: {_ext_list()})")
    return train, val, skipped


def list_flat_images(folder: Path) -> tuple[list[Path], list[SkippedFile]]:
    """Image files directly inside ``folder`` (a Kaggle-style flat test folder), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FaceclsError(f"image folder {folder} does not exist")
    images, skipped = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        why = None if is_hidden(entry.name) else not_a_regular_file(entry)
        if is_prepare_output(entry):
            continue
        if entry.is_dir():
            skipped.append(SkippedFile(entry.name + "/", "folder inside a flat image folder"))
        elif why:
            skipped.append(SkippedFile(entry.name, why))
        elif is_image_name(entry.name):
            images.append(entry)
        else:
            skipped.append(SkippedFile(entry.name, "hidden file" if is_hidden(entry.name) else "not an image"))
    if not images:
        raise FaceclsError(f"no images found in {folder} (extensions: {_ext_list()})")
    return images, skipped


def write_skipped(path: Path, skipped: list[SkippedFile]) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows((escape_name(s.path), s.reason) for s in skipped)


def read_skipped(path: Path) -> list[SkippedFile]:
    """The files a run left out (empty when it has no skipped_files.csv yet)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        return [SkippedFile(unescape_name(r["path"]), r["reason"]) for r in csv.DictReader(handle)]


def _ext_list() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))

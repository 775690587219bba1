"""Labeled Faces in the Wild: download, verify and lay out as `OUT/train/<identity>/<image>.jpg`.

Backs `facecls data lfw DIR [--min-images N]`. The archive and `pairs.txt` are pinned by SHA-256 (URLs and
checksums as published in scikit-learn's `sklearn/datasets/_lfw.py`), downloaded once into
`cache_dir()/lfw` and reused. Extraction is all-or-nothing: the tree is built in a staging folder beside
OUT and renamed into place, so a bad checksum or a broken archive leaves OUT exactly as it was.

Re-running into the same OUT: if `OUT/lfw.json` records the same archive (sha256), variant and
`min_images`, the existing tree is kept and its summary returned; any other existing, non-empty
`OUT/train` is refused rather than mixed with or overwritten.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from facecls.core.download import cache_dir, download_file, is_offline, sha256_file
from facecls.core.errors import FaceclsError

Variant = Literal["funneled", "original"]
SUMMARY_FILE = "lfw.json"
IMAGE_SUFFIX = ".jpg"


@dataclass(frozen=True)
class RemoteFile:
    """A file facecls downloads: where from, the name it is cached under, and its pinned SHA-256."""

    filename: str
    url: str
    sha256: str


# From scikit-learn's sklearn/datasets/_lfw.py (figshare mirrors of the files on vis-www.cs.umass.edu/lfw/).
LFW_FILES: dict[str, RemoteFile] = {
    "funneled": RemoteFile(
        "lfw-funneled.tgz",
        "https://ndownloader.figshare.com/files/5976015",
        "b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a",
    ),
    "original": RemoteFile(
        "lfw.tgz",
        "https://ndownloader.figshare.com/files/5976018",
        "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0",
    ),
    "pairs": RemoteFile(
        "pairs.txt",
        "https://ndownloader.figshare.com/files/5976006",
        "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592",
    ),
}
# The folder each archive unpacks into: <root>/<Name_Surname>/<Name_Surname>_0001.jpg
ARCHIVE_ROOTS: dict[str, str] = {"funneled": "lfw_funneled", "original": "lfw"}


@dataclass(frozen=True)
class LfwSummary:
    """What `fetch_lfw` produced; also written to `OUT/lfw.json`."""

    out_dir: Path
    train_dir: Path
    identities: int
    images: int
    skipped_identities: int
    skipped_images: int
    min_images: int
    variant: str
    archive_sha256: str
    pairs_path: Path | None

    def to_dict(self) -> dict[str, object]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def lfw_cache_dir() -> Path:
    """Where the LFW archive and pairs.txt are cached: `cache_dir()/lfw`."""
    return cache_dir() / "lfw"


def fetch_lfw(
    out_dir: Path,
    min_images: int = 1,
    *,
    variant: Variant = "funneled",
    offline: bool = False,
    base_url: str | None = None,
    archive: Path | None = None,
    progress: bool = True,
) -> LfwSummary:
    """Download (or take `archive`), verify and extract LFW into `out_dir/train/<identity>/<image>.jpg`.

    Only identities with at least `min_images` images are kept. `out_dir/pairs.txt` (the standard
    verification pairs, listed over the full LFW) is written when it is cached or can be downloaded;
    offline without it, it is skipped and `pairs_path` is None.
    `base_url` replaces the download host: files are fetched as `<base_url>/<filename>` (a mirror, or a
    test server). `archive` is a copy the user downloaded; it must match the pinned checksum.
    """
    if variant not in ARCHIVE_ROOTS:
        raise FaceclsError(f"unknown LFW variant {variant!r}; choose one of: {', '.join(ARCHIVE_ROOTS)}")
    if min_images < 1:
        raise FaceclsError(f"--min-images must be at least 1, got {min_images}")
    out_dir = Path(out_dir).absolute()
    remote = LFW_FILES[variant]
    existing = _existing_summary(out_dir, remote.sha256, variant, min_images)
    if existing is not None:
        return existing

    archive_path = _archive_path(remote, archive, offline=offline, base_url=base_url, progress=progress)
    pairs = _pairs_path(offline=offline, base_url=base_url, progress=progress)

    # Staged beside the real out_dir (symlinks resolved) so the final renames stay on one filesystem.
    real_out = out_dir.resolve()
    real_out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{real_out.name}.lfw-", dir=real_out.parent))
    try:
        counts = _extract_identities(archive_path, ARCHIVE_ROOTS[variant], min_images, staging)
        kept = {name: n for name, n in counts.items() if n >= min_images}
        summary = LfwSummary(
            out_dir=out_dir,
            train_dir=out_dir / "train",
            identities=len(kept),
            images=sum(kept.values()),
            skipped_identities=len(counts) - len(kept),
            skipped_images=sum(counts.values()) - sum(kept.values()),
            min_images=min_images,
            variant=variant,
            archive_sha256=remote.sha256,
            pairs_path=out_dir / "pairs.txt" if pairs is not None else None,
        )
        if pairs is not None:
            shutil.copyfile(pairs, staging / "pairs.txt")
        (staging / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        # Everything is staged; only renames from here on.
        out_dir.mkdir(exist_ok=True)
        if summary.train_dir.is_dir():
            summary.train_dir.rmdir()  # empty (checked by _existing_summary); rename needs the name free
        os.replace(staging / "train", summary.train_dir)
        if summary.pairs_path is not None:
            os.replace(staging / "pairs.txt", summary.pairs_path)
        os.replace(staging / SUMMARY_FILE, out_dir / SUMMARY_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _existing_summary(out_dir: Path, sha256: str, variant: str, min_images: int) -> LfwSummary | None:
    """The summary of an identical earlier extraction into `out_dir`, None when there is nothing there.

    Raises when `out_dir/train` holds something else, so it is never overwritten or mixed.
    """
    train_dir = out_dir / "train"
    if not train_dir.is_dir() or not any(train_dir.iterdir()):
        if train_dir.exists() and not train_dir.is_dir():
            raise FaceclsError(f"{train_dir} exists and is not a folder; move it away or choose another DIR")
        return None
    try:
        recorded = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        recorded = None
    if (
        isinstance(recorded, dict)
        and recorded.get("archive_sha256") == sha256
        and recorded.get("variant") == variant
        and recorded.get("min_images") == min_images
    ):
        return LfwSummary(
            out_dir=out_dir,
            train_dir=train_dir,
            identities=int(recorded["identities"]),
            images=int(recorded["images"]),
            skipped_identities=int(recorded["skipped_identities"]),
            skipped_images=int(recorded["skipped_images"]),
            min_images=min_images,
            variant=variant,
            archive_sha256=sha256,
            pairs_path=out_dir / "pairs.txt" if recorded.get("pairs_path") else None,
        )
    if isinstance(recorded, dict) and "min_images" in recorded:
        what = f"LFW ({recorded.get('variant')}, --min-images {recorded.get('min_images')})"
    else:
        what = "files not written by `facecls data lfw`"
    raise FaceclsError(
        f"{train_dir} already holds {what}; refusing to overwrite or mix it. "
        f"Delete {train_dir} or choose another output folder."
    )


def _archive_path(
    remote: RemoteFile, archive: Path | None, *, offline: bool, base_url: str | None, progress: bool
) -> Path:
    """The verified archive: the user's file, or the cached/downloaded copy."""
    if archive is not None:
        archive = Path(archive)
        if not archive.is_file():
            raise FaceclsError(f"--archive {archive}: no such file")
        digest = sha256_file(archive)
        if digest != remote.sha256:
            raise FaceclsError(
                f"--archive {archive} has sha256 {digest}, but {remote.filename} has {remote.sha256}: "
                f"it is corrupt or a different file. Download {remote.url} again."
            )
        return archive
    cached = lfw_cache_dir() / remote.filename
    url = _url(remote, base_url)
    if is_offline(offline) and not cached.is_file():
        raise FaceclsError(
            f"the LFW archive is not cached and offline mode is on. Download {url} "
            f"(sha256 {remote.sha256}) and put it at {cached}, or pass --archive FILE."
        )
    try:
        return download_file(url, cached, remote.sha256, offline=offline, progress=progress)
    except FaceclsError as err:
        raise FaceclsError(f"{err} Or pass --archive FILE with a copy you downloaded yourself.") from err


def _pairs_path(*, offline: bool, base_url: str | None, progress: bool) -> Path | None:
    """The verified pairs.txt from the cache (downloaded if online); None when offline and not cached."""
    remote = LFW_FILES["pairs"]
    cached = lfw_cache_dir() / remote.filename
    if is_offline(offline) and not cached.is_file():
        return None
    return download_file(_url(remote, base_url), cached, remote.sha256, offline=offline, progress=progress)


def _url(remote: RemoteFile, base_url: str | None) -> str:
    return f"{base_url.rstrip('/')}/{remote.filename}" if base_url else remote.url


def _extract_identities(archive: Path, root: str, min_images: int, staging: Path) -> dict[str, int]:
    """Extract `<root>/<identity>/*.jpg` of identities with >= min_images images into `staging/train`.

    Returns the image count of every identity in the archive. Refuses archives with absolute or `..`
    member paths; only regular files are extracted.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            by_identity: dict[str, list[tarfile.TarInfo]] = {}
            for member in members:
                path = PurePosixPath(member.name)
                parts = path.parts
                if path.is_absolute() or member.name.startswith("\\") or ".." in parts:
                    raise FaceclsError(
                        f"{archive} has an unsafe member path {member.name!r} (absolute or with '..'); "
                        "refusing to extract it. Use the original LFW archive."
                    )
                if member.isfile() and len(parts) == 3 and parts[0] == root and parts[2].lower().endswith(IMAGE_SUFFIX):
                    by_identity.setdefault(parts[1], []).append(member)
            if not by_identity:
                raise FaceclsError(
                    f"{archive} holds no images under {root}/<identity>/; it is not the LFW archive expected."
                )
            most = max(len(group) for group in by_identity.values())
            if most < min_images:
                raise FaceclsError(
                    f"no identity in LFW has {min_images} images (the most is {most}); lower --min-images."
                )
            selected = [m for group in by_identity.values() if len(group) >= min_images for m in group]
            extract_root = staging / "extract"
            if hasattr(tarfile, "data_filter"):
                tar.extractall(extract_root, members=selected, filter="data")
            else:  # Python < 3.10.12: members were checked above and are regular files only
                tar.extractall(extract_root, members=selected)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise FaceclsError(
            f"cannot read the LFW archive {archive}: {err}. The file is broken; delete it and run again."
        ) from err
    os.replace(extract_root / root, staging / "train")
    return {name: len(group) for name, group in by_identity.items()}

"""The one download path for weights and datasets: cache, resume, checksum, atomic rename, offline mode.

Every file facecls fetches goes through `download_file`, so the rules hold everywhere:
a file already in place (and matching its checksum) is used as is; with `FACECLS_OFFLINE=1` the network is
never touched and the error says where to put the file by hand; an interrupted download resumes from
its `.part` file; nothing appears at the destination until it is complete and verified.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from facecls import __version__
from facecls.core.console import progress_bar
from facecls.core.errors import FaceclsError

OFFLINE_ENV = "FACECLS_OFFLINE"
CACHE_ENV = "FACECLS_CACHE"
_CHUNK = 1 << 20
_TRUE = {"1", "true", "yes", "on"}
# torch hub names checkpoints `<name>-<first 8+ hex chars of the sha256>.<ext>`, e.g. resnet50-0676ba61.pth
_HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")
# What a failing network looks like through urllib: refused/reset connections, DNS failures, timeouts,
# HTTP errors (HTTPError is a URLError) and connections closed mid-response.
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


def is_offline(flag: bool = False) -> bool:
    """True when the caller asked for offline mode or `FACECLS_OFFLINE` is set to 1/true/yes/on."""
    return flag or os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def cache_dir() -> Path:
    """facecls's cache root for datasets and other downloads.

    `$FACECLS_CACHE` if set, else `$XDG_CACHE_HOME/facecls`, else `~/.cache/facecls`.
    Model weights do not live here but in `hub_checkpoints_dir()`, shared with torch hub.
    """
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "facecls"


def hub_checkpoints_dir() -> Path:
    """Where torch hub keeps downloaded checkpoints (`torch.hub.get_dir()/checkpoints`, honours TORCH_HOME).

    Weights are stored there so a checkpoint already fetched by torchvision/timm is reused, not re-downloaded.
    """
    import torch.hub  # imported here: importing facecls.core.download should not pay for torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_prefix_from_name(name: str) -> str | None:
    """The sha256 prefix a torch-hub style file name carries (`resnet50-0676ba61.pth` -> `0676ba61`)."""
    match = _HUB_HASH.search(name)
    return match.group(1) if match else None


def check_hash_prefix(path: str | os.PathLike[str], prefix: str) -> str:
    """Check that the file's sha256 starts with `prefix`; return the full digest.

    Raises FaceclsError on a mismatch (the file is corrupt or not the one the name promises).
    """
    digest = sha256_file(path)
    if not digest.startswith(prefix.lower()):
        raise FaceclsError(
            f"{path}: sha256 starts with {digest[: len(prefix)]}, expected {prefix.lower()} "
            f"(full sha256 {digest}); the file is corrupt or not the one its name promises. "
            "Delete it and download it again."
        )
    return digest


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None = None,
    *,
    hash_prefix: str | None = None,
    offline: bool = False,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Make sure `dest` holds the file from `url`, downloading it if needed; return `dest`.

    - `dest` already there and matching `sha256`/`hash_prefix` (or none given): returned untouched.
    - Offline (`offline=True` or FACECLS_OFFLINE=1): never touches the network; a missing file is a
      FaceclsError naming the URL and the exact path to put it at.
    - Otherwise streams into `<dest>.part`, resuming an existing `.part` with an HTTP Range request
      (a server that answers 200 instead of 206 gets a fresh download), verifies the checksum, fsyncs
      and renames into place atomically. A checksum mismatch deletes the `.part`; a network failure keeps
      it for the next try.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    prefix = hash_prefix.lower() if hash_prefix else None
    if dest.is_file():
        problem = _checksum_problem(dest, expected, prefix)
        if problem is None:
            return dest
        if is_offline(offline):
            raise FaceclsError(
                f"{dest} exists but {problem}, and offline mode is on. "
                f"Replace it with a good copy from {url}, or go online to download it again."
            )
        # A stale or corrupt file: download again; it is replaced only once the new copy is verified.
    elif is_offline(offline):
        checksum = f" (sha256 {expected})" if expected else ""
        raise FaceclsError(
            f"{dest.name} is not in the cache and offline mode is on. "
            f"Download {url}{checksum} yourself and put it at {dest}, or go online."
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    # A .part that is already complete (e.g. killed between download and rename) needs no network.
    if not (expected and part.is_file() and _checksum_problem(part, expected, prefix) is None):
        try:
            _fetch(url, part, progress=progress, timeout=timeout)
        except _NETWORK_ERRORS as err:
            raise FaceclsError(_network_message(url, dest, part, expected, err)) from err
        except ValueError as err:  # urllib's answer to a malformed URL
            raise FaceclsError(f"cannot download {url!r}: {err}") from err
        problem = _checksum_problem(part, expected, prefix)
        if problem is not None:
            part.unlink()
            raise FaceclsError(
                f"the file downloaded from {url} {problem}: it may be corrupt, or the file at that URL "
                "has changed. The partial file was deleted; try again, or download it yourself and put it "
                f"at {dest}."
            )
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return dest


def _checksum_problem(path: Path, sha256: str | None, prefix: str | None) -> str | None:
    """None when `path` matches the expected checksum/prefix, else a phrase saying what is wrong."""
    if sha256 is None and prefix is None:
        return None
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        return f"has sha256 {digest}, expected {sha256}"
    if prefix is not None and not digest.startswith(prefix):
        return f"has sha256 {digest}, expected one starting with {prefix}"
    return None


def _fetch(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    """Stream `url` into `part`, appending when the server honours a Range request for the bytes we lack."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"facecls/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # our .part is not a prefix the server can continue: start over
            err.close()
            part.unlink()
            _fetch(url, part, progress=progress, timeout=timeout)
            return
        raise
    with response:
        resumed = response.status == 206
        if resumed and _range_start(response.headers.get("Content-Range")) != offset:
            response.close()  # a range we did not ask for: start over without one
            part.unlink()
            _fetch(url, part, progress=progress, timeout=timeout)
            return
        if not resumed:
            offset = 0  # the server ignored the Range header: a 200 carries the file from its first byte
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        written = offset
        with (
            open(part, "ab" if resumed else "wb") as f,
            progress_bar(part.stem, total, offset, enabled=progress, unit="bytes") as bar,
        ):
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                written += len(chunk)
                bar.advance(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and written != total:
        raise http.client.IncompleteRead(b"", total - written)


def _range_start(content_range: str | None) -> int | None:
    """First byte of a `Content-Range: bytes START-END/TOTAL` header."""
    match = re.match(r"bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _network_message(url: str, dest: Path, part: Path, sha256: str | None, err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        reason = f"the server answered HTTP {err.code} {err.reason}"
    elif isinstance(err, urllib.error.URLError):
        reason = str(err.reason)
    elif isinstance(err, http.client.IncompleteRead):
        reason = "the connection closed before the whole file arrived"
    else:
        reason = str(err) or type(err).__name__
    kept = ""
    if part.is_file() and part.stat().st_size:
        kept = f" The {part.stat().st_size} bytes received so far are kept in {part}; the next run resumes."
    checksum = f" (sha256 {sha256})" if sha256 else ""
    return (
        f"could not download {url} to {dest}: {reason}.{kept} Check the network, or download the file"
        f"{checksum} yourself and put it at {dest} (set {OFFLINE_ENV}=1 to never try the network)."
    )


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

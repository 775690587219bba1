"""One checkpoint layout, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import errno
import functools
import os
import random
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from facecls.core.errors import FaceclsError

FORMAT_VERSION = 1


def rng_state() -> dict:
    """Python, numpy and torch RNG states as plain tensors/ints (loadable with weights_only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync dir.

    If writing fails (a full disk, say) the temp file is removed and the previous file is untouched.
    """
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is a normal file
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise FaceclsError(_write_error(exc, path)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(exc: OSError, path: Path) -> str:
    kept = "the previous checkpoint is intact" if path.exists() else "no previous checkpoint existed"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: could not write checkpoint {path} ({kept}); free space in {path.parent} and resume"
    return f"could not write checkpoint {path}: {exc.strerror or exc} ({kept})"


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of checkpoint saves that a killed process left behind."""
    for tmp in Path(folder).glob(".*.ckpt.*.tmp"):
        tmp.unlink(missing_ok=True)


def describe_load_error(exc: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file (torch's own text is a page
    that ends by suggesting weights_only=False, which is exactly what must not be done here)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    unsafe = re.search(r"WeightsUnpickler error: ([^\n]*?)(\.\s|\n|$)", text)
    if unsafe:
        return f"it holds Python objects that could run code when unpickled: {unsafe.group(1)[:160]}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"truncated or corrupt file ({type(exc).__name__}: {first[:160]})" if first else type(exc).__name__


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights_only=True; a file that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise FaceclsError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # torch's warnings would come before the one-line refusal
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or unsafe: either way, refuse with a clear line
        raise FaceclsError(
            f"refusing to load {path}: not a readable facecls checkpoint ({describe_load_error(exc)})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "class_names" not in state:
        raise FaceclsError(f"{path} is not a facecls checkpoint")
    return state


def load_model_state(model: torch.nn.Module, weights: dict, source: Path | str) -> None:
    """Load a checkpoint's model weights; a checkpoint of another model or head is one clear error."""
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in weights.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    reshaped = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        first = (reshaped or missing or unexpected)[0]
        raise FaceclsError(
            f"checkpoint {source} does not fit this {type(model).__name__} ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} of another shape; first: {first}): "
            "was it written for another model, head or number of classes?"
        )
    model.load_state_dict(weights)

"""One checkpoint layout, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import errno
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from facecls.core import atomic
from facecls.core.atomic import atomic_write
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
    """Write ``state`` to ``path`` atomically (through the one writer, ``atomic_write``).

    If writing fails (a full disk, say) the temp file is removed and the previous file is untouched.
    """
    path = Path(path)
    state = {"format_version": FORMAT_VERSION, **state}
    try:
        with atomic_write(path, "wb") as handle:
            torch.save(state, handle)
    except OSError as exc:
        raise FaceclsError(_write_error(exc, path)) from None
    except RuntimeError as exc:
        # torch.save's zip writer turns a failed write (ENOSPC included) into a RuntimeError
        # ("[enforce fail at inline_container.cc:...] . unexpected pos ..."), the OSError lost.
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        raise FaceclsError(_write_error(_as_os_error(exc, path), path)) from None


def _as_os_error(exc: RuntimeError, path: Path) -> OSError:
    """The OSError behind a RuntimeError of torch's zip writer: the chained one, or ENOSPC when the
    folder's file system has next to no free space left (the usual reason), else EIO."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return cause
    try:
        full = shutil.disk_usage(path.parent).free < 64 * 2**20
    except OSError:
        full = False
    return OSError(errno.ENOSPC if full else errno.EIO, "write failed" if not full else "No space left on device")


def _write_error(exc: OSError, path: Path) -> str:
    kept = "the previous checkpoint is intact" if path.exists() else "no previous checkpoint existed"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: could not write checkpoint {path} ({kept}); free space in {path.parent} and resume"
    return f"could not write checkpoint {path}: {exc.strerror or exc} ({kept})"


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temp files of saves that a killed process left behind (run folder lock held)."""
    atomic.remove_stale_temp_files(folder)


def describe_load_error(exc: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file (torch's own text is a page
    that ends by suggesting weights_only=False, which is exactly what must not be done here)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    unsafe = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(\.\s|\n|$)", text)
    if unsafe and re.search(r"Unsupported global|GLOBAL|REDUCE|BUILD", text):
        return f"it holds Python objects that could run code when unpickled: {unsafe.group(1)[:160]}"
    if unsafe:  # a pickle opcode torch does not know: bytes that are no checkpoint at all
        detail = next((line.strip() for line in text[unsafe.start() :].splitlines()[1:] if line.strip()), "")
        return f"not a torch checkpoint: damaged or random bytes ({detail[:120]})"
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
    except PermissionError as exc:  # other OSErrors (EINVAL from a seek past the end) mean a torn file
        raise FaceclsError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - corrupt or unsafe: either way, refuse with a clear line
        raise FaceclsError(
            f"refusing to load {path}: not a readable facecls checkpoint ({describe_load_error(exc)})"
            + _intact_sibling_hint(path)
        ) from None
    if not isinstance(state, dict) or "model" not in state or "class_names" not in state:
        raise FaceclsError(f"{path} is not a facecls checkpoint")
    return state


def _intact_sibling_hint(path: Path) -> str:
    """For a damaged last.ckpt: whether the run's best.ckpt next to it still loads, and how to use it."""
    best = path.with_name("best.ckpt")
    if path.name != "last.ckpt" or not best.is_file():
        return ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(best, map_location="cpu", weights_only=True)
        epoch = int(state["epoch"])
    except Exception:  # noqa: BLE001 - damaged too: no hint to give
        return ""
    return (
        f"; {best.name} (epoch {epoch}) is intact: evaluate/predict use it, and copying it over "
        f"{path.name} resumes training from the end of epoch {epoch}"
    )


def load_model_state(model: torch.nn.Module, weights: dict, source: Path | str) -> None:
    """Load a checkpoint's model weights; a checkpoint of another model or head is one clear error."""
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in weights.items()}
    for name, module in model.named_modules():  # e.g. a kNN head's gallery, sized by what was trained
        if hasattr(module, "resize_buffers"):
            module.resize_buffers(weights, f"{name}." if name else "")
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

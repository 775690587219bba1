"""Speed choices made from the machine and the recipe: device, precision, memory format, workers."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from facecls.config import SpeedConfig
from facecls.errors import FaceclsError


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """bf16 matmul in hardware: AMX-BF16 or AVX512-BF16 (elsewhere CPU bf16 is emulated and slow)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


@dataclass(frozen=True)
class Runtime:
    """Resolved speed settings; recorded in the run folder."""

    device: str
    precision: str
    channels_last: bool
    compile: bool
    workers: int
    pin_memory: bool
    threads: int

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled only for fp16 (bf16 has fp32's range and needs no loss scaling)."""
        return torch.amp.GradScaler(torch.device(self.device).type, enabled=self.precision == "fp16")

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_runtime(config: SpeedConfig, device: str | None = None, local_rank: int = 0) -> Runtime:
    """Pick device, precision and loader settings from ``config`` and the machine."""
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    is_cuda = device.startswith("cuda")
    precision = config.precision
    if precision == "auto":
        if is_cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and not is_cuda:
        raise FaceclsError("speed.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores_per_proc = max(1, cores // local_procs)
    if config.workers is not None:
        workers = config.workers
    elif is_cuda:
        workers = min(8, max(1, cores_per_proc - 1))
    else:
        # On CPU the model and the loader share the cores; one worker keeps the augmentation of the
        # decoded-cache images ahead of the model (measured: 5-30x what the models consume).
        workers = 1 if cores_per_proc >= 2 else 0
    if config.threads is not None:
        threads = config.threads
    elif is_cuda:
        threads = torch.get_num_threads()
    else:
        # Compute threads and loader workers never share a core: OpenMP's spinning barriers collapse as soon
        # as a compute thread loses its core (measured on 2 cores: 2 threads + 1 worker 2.5-4x slower than
        # 1 + 1 under load; 1.35x faster on an idle machine). speed.threads overrides.
        threads = max(1, cores_per_proc - workers)
    return Runtime(
        device=device,
        precision=precision,
        channels_last=config.channels_last,
        compile=config.compile,
        workers=workers,
        pin_memory=is_cuda if config.pin_memory is None else config.pin_memory,
        threads=threads,
    )

"""What this process may use of the machine, without importing torch (the CLI launcher and ``prepare``
ask before torch is loaded, if it ever is)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one (containers, taskset), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
"""The ISA flags that change which CPU kernels are fastest (bf16 in hardware; AMX tiles)."""


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU's vendor and model name and the ISA flags of SPEED_FLAGS it has (from /proc/cpuinfo; empty
    elsewhere), and its kind: "amx" (bf16 tiles: bf16 convolutions ~8x fp32), "avx512_bf16" (bf16 dot products, ~2x)
    or "other". Speed choices that differ by kind read it; run.json and benchmark results record it."""
    vendor, model, flags = "", "", set()
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    kind = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "other"
    import platform

    return {
        "vendor": vendor or "unknown",
        "model": model or platform.processor() or "unknown CPU",
        "kind": kind,
        "flags": [f for f in SPEED_FLAGS if f in flags],
        "cpus": available_cpus(),
    }


def cpu_text() -> str:
    """One line for logs and benchmark results: model, kind, ISA flags, CPUs."""
    info = cpu_info()
    return f"{info['model']} ({info['kind']}; {' '.join(info['flags']) or 'no AVX-512/AMX'}; {info['cpus']} CPUs)"

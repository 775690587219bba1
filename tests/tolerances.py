"""Tolerances derived from the arithmetic, for comparing two computations that may sum in another order
(processes, batch sizes, threads, CPU kernels: AMX and AVX-512 bf16 pick different blockings).

Recomputing a sum of n float32 terms in another order changes it by at most about n * u times the sum of
the terms' magnitudes (u: the unit roundoff). The bounds below are that worst case, so they hold on every
CPU, and they stay far below the effect the tests look for (one image changing its prediction)."""

FP32_U = 2.0**-24  # float32 unit roundoff (24-bit significand)
BF16_U = 2.0**-8  # bfloat16 unit roundoff (8-bit significand)


def sum_rtol(terms: int, unit: float = FP32_U) -> float:
    """Relative tolerance for a sum of ``terms`` same-sign values accumulated in another order."""
    return terms * unit


def dot_atol(terms: int, magnitude: float = 1.0, unit: float = FP32_U) -> float:
    """Absolute tolerance for a dot product of ``terms`` products of at most ``magnitude`` each."""
    return terms * unit * magnitude

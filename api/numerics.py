"""Reproducible float numerics for reproductions: the same CPU kernels on any x86-64 machine with AVX2.

Training is chaotic: two machines that run the same code and seed but different SIMD kernels (torch
picks AVX-512 kernels where the CPU has them, AVX2 ones elsewhere; MKL and oneDNN dispatch the same
way) end with different models. Measured here: the tiny Llama base of `models.llm.base`, same code,
recipe and seed, reached validation perplexity 221.0 with AVX-512 kernels, 195.7 with AVX2 kernels
and 203.2 with none, and the AVX2 one is bit-identical to the base the earlier records were measured
with on an AVX2-only machine. So `crucible reproduce` and `crucible results` run every reproduction
with the AVX2 kernels of torch, MKL (conditional numerical reproducibility) and oneDNN pinned before
torch is imported, and each record names the kernels it ran with (`numerics`). A variable already set
by the user wins. Other architectures keep their own kernels (and say so in the record).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

# the AVX2 level of torch's own kernels, MKL's conditional-numerical-reproducibility branch and oneDNN's ISA cap
X86_PROFILE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def reproducible_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the profile added where the user has not set its variables."""
    out = dict(os.environ if env is None else env)
    if platform.machine().lower() in ("x86_64", "amd64"):
        for key, value in X86_PROFILE.items():
            out.setdefault(key, value)
    return out


def pin_numerics() -> bool:
    """Apply the profile to this process; only possible before torch is imported (False if it was)."""
    if "torch" in sys.modules:
        return False
    os.environ.update(reproducible_environment())
    return True

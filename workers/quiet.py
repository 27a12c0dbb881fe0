"""Third-party noise kept out of the CLI's output and the job logs, at its source.

Importing transformers, diffusers or peft on a CPU machine with torchao and bitsandbytes installed makes
those libraries log what a user cannot act on: torchao's `Failed to load …/_C_mxfp8….so` for CUDA
kernels, torch's `_pytree` deprecation notes about torchao's enums, bitsandbytes' `Failed to load CPU
gemm_4bit_forward from kernels-community`, diffusers' `Unable to import torchao Tensor objects`; and the
Hugging Face loaders draw tqdm bars ("Loading weights: 100%|…") whose carriage returns turn a job's log
into residue. `quiet_third_party()` turns those loggers down to errors and the bars off, before the
libraries are imported (it is cheap and imports none of them). Our own output, and real errors of theirs,
still come through.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

# logger → the level below which its records are dropped (each library names its loggers by module)
NOISY_LOGGERS = (
    "torchao",  # `Failed to load …/_C_*.so` (CUDA-only kernels) on every import
    "torch.utils._pytree",  # torchao registering enums as pytree constants (a deprecation note)
    "bitsandbytes",  # the CPU gemm_4bit kernel it tries to fetch from the hub
    "kernels",  # the hub kernel loader bitsandbytes calls
    "diffusers.quantizers",  # `Unable to import torchao Tensor objects`
)
# environment the libraries read when they start: no progress bars, no advisory warnings
QUIET_ENV = {
    "TQDM_DISABLE": "1",  # every tqdm bar (tqdm ≥ 4.66 reads TQDM_* defaults)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}
NOISY_WARNINGS = (
    r".*torch\.jit\.script_method.* is deprecated.*",  # torch.jit's own deprecation of what libraries still call
    r".*is an Enum subclass and is now natively supported.*",
)


def quiet_third_party() -> None:
    """Turn the known third-party noise off for this process and the processes it starts (an explicitly set
    environment variable wins)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    _tqdm_off_by_default()


def _tqdm_off_by_default() -> None:
    """tqdm reads TQDM_DISABLE when it is imported; if it was imported already (torch's neighbours import it),
    make `disable=True` its default here too. A caller that passes `disable=False` still gets its bar."""
    std = sys.modules.get("tqdm.std")
    if std is None or getattr(std.tqdm, "_quiet_by_default", False):
        return
    std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)  # type: ignore[method-assign]
    std.tqdm._quiet_by_default = True

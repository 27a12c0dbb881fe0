"""Measuring codecs on one set of images: bits per dimension (actual, from the stream's length, and theoretical,
−log₂ p / D), encode and decode wall time, and whether decoding gave the images back."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from models.compression import ans
from models.compression.baselines import byte_codecs


@dataclass(frozen=True)
class CodecResult:
    codec: str
    bits_per_dim: float
    theoretical_bits_per_dim: float | None
    encode_seconds: float | None
    decode_seconds: float | None
    roundtrip_ok: bool | None

    def row(self, images: int) -> dict[str, object]:
        """The table row, with decode throughput in images per second."""
        out: dict[str, object] = asdict(self)
        out["decode_images_per_s"] = images / self.decode_seconds if self.decode_seconds else None
        return out


def measure_sequential(
    name: str, model: ans.SequentialModel, x: torch.Tensor, log_likelihood: torch.Tensor
) -> tuple[CodecResult, np.ndarray]:
    """Code x as one ANS stream with `model`, decode it back, time both; `log_likelihood` [N] (nats) gives the
    theoretical rate. Returns the result and the stream."""
    start = time.perf_counter()
    words = ans.encode(model, x)
    encoded = time.perf_counter()
    decoded = ans.decode(model, words, *x.shape)
    done = time.perf_counter()
    result = CodecResult(
        name,
        32 * len(words) / x.numel(),
        ans.nats_to_bits(-float(log_likelihood.sum())) / x.numel(),
        encoded - start,
        done - encoded,
        bool(torch.equal(decoded, x)),
    )
    return result, words


def measure_bytes(x: torch.Tensor, side: int) -> list[CodecResult]:
    return [
        CodecResult(name, 8 * size / x.numel(), None, None, None, None) for name, size in byte_codecs(x, side).items()
    ]

"""Entropy coding through constriction's stack-based rANS coder (`constriction.stream.stack.AnsCoder` with the
`Categorical(perfect=False)` model family; Bamler, "Understanding Entropy Coding With Asymmetric Numeral
Systems (ANS)", 2022).

Any model that yields conditionals variable by variable (`SequentialModel`: `start`, `pmf`, `commit`, an `order`)
codes a whole batch of images as one stream, so the coder's start-up bits are paid once. Symbols go variable-major
(all images' first variable, then the second, …): decoding then needs, at each step, conditionals for every image
at once, which a batched model computes in one call. ANS is a stack, so the encoder pushes the variables in reverse
and the decoder pops them forward; both call the model in the same order and get bit-identical probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import constriction
import numpy as np
import torch


class SequentialModel(Protocol):
    """Conditionals p(X_var = · | the variables committed so far), for N images at once."""

    order: Sequence[int]

    def start(self, n: int) -> None: ...

    def pmf(self, var: int) -> torch.Tensor: ...

    def commit(self, var: int, values: torch.Tensor) -> None: ...


def _family() -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(perfect=False)


def _probabilities(pmf: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(pmf.detach().to(torch.float64).numpy())


def teacher_forced_pmfs(model: SequentialModel, x: torch.Tensor) -> list[torch.Tensor]:
    """p(X_var = · | x_<var) for every variable in the model's order ([N, K] each), committing x's values."""
    model.start(len(x))
    pmfs = []
    for var in model.order:
        pmfs.append(model.pmf(var))
        model.commit(var, x[:, var])
    return pmfs


def encode(model: SequentialModel, x: torch.Tensor) -> np.ndarray:
    """The images x ([N, D] symbols) as one ANS stream of uint32 words."""
    pmfs = [_probabilities(p) for p in teacher_forced_pmfs(model, x)]
    coder, family = constriction.stream.stack.AnsCoder(), _family()
    for var, probabilities in zip(reversed(model.order), reversed(pmfs)):
        coder.encode_reverse(x[:, var].numpy().astype(np.int32), family, probabilities)
    return coder.get_compressed()


def decode(model: SequentialModel, words: np.ndarray, n: int, num_vars: int) -> torch.Tensor:
    """The [n, num_vars] symbols that `encode` turned into `words`."""
    coder, family = constriction.stream.stack.AnsCoder(np.asarray(words, dtype=np.uint32)), _family()
    model.start(n)
    x = torch.zeros(n, num_vars, dtype=torch.long)
    for var in model.order:
        values = torch.from_numpy(coder.decode(family, _probabilities(model.pmf(var))).astype(np.int64))
        x[:, var] = values
        model.commit(var, values)
    return x


def conditional_log_probs(model: SequentialModel, x: torch.Tensor) -> torch.Tensor:
    """[N]: Σ_var log p(x_var | x_<var), the chain rule the coder spends its bits on (nats)."""
    rows = torch.arange(len(x))
    pmfs = teacher_forced_pmfs(model, x)
    return sum(
        (p.to(torch.float64)[rows, x[:, var]].log() for var, p in zip(model.order, pmfs)),
        torch.zeros(len(x), dtype=torch.float64),
    )


def bits_per_dim(bits: float, x: torch.Tensor) -> float:
    return bits / x.numel()


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)

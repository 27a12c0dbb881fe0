"""EigenScore and its Efficient EigenScore (KPM + Hutchinson) estimate."""

from __future__ import annotations

import math

import torch

from models.eigenscore import (
    centred,
    chebyshev_log_coefficients,
    efficient_eigenscore,
    eigenscore,
    largest_singular_value,
)

torch.set_num_threads(1)


def embeddings(k: int = 100, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3


def test_exact_eigenscore_matches_the_gram_form_by_sylvesters_identity():
    z = embeddings(k=10, d=32).double()
    zc = centred(z)
    gram = torch.linalg.slogdet(zc @ zc.T + 0.5 * torch.eye(10, dtype=torch.float64)).logabsdet.item()
    assert math.isclose(eigenscore(z, 0.5), (gram + 22 * math.log(0.5)) / 10, rel_tol=1e-9)


def test_chebyshev_series_of_the_log_converges_on_the_spectrum_interval():
    lo, hi = 1.0, 40.0
    coeffs = chebyshev_log_coefficients((hi + lo) / 2, (hi - lo) / 2, 50)
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    series = sum(c * torch.cos(m * torch.arccos(x)) for m, c in enumerate(coeffs))
    torch.testing.assert_close(series, torch.log((hi + lo) / 2 + (hi - lo) / 2 * x), atol=1e-6, rtol=0)


def test_power_iteration_finds_the_largest_singular_value():
    zc = centred(embeddings().double())
    assert math.isclose(largest_singular_value(zc, 100), torch.linalg.matrix_norm(zc, 2).item(), rel_tol=1e-6)


def test_efficient_eigenscore_is_within_five_percent_of_the_exact_log_determinant():
    z = embeddings()
    exact = eigenscore(z, 1.0)
    for seed in range(3):
        estimate = efficient_eigenscore(z, 1.0, moments=50, probes=100, generator=torch.Generator().manual_seed(seed))
        assert abs(estimate - exact) <= 0.05 * abs(exact), (estimate, exact)

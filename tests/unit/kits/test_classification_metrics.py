"""Shared classification metrics: torchmetrics' ECE agrees with our reliability bins, NLL is CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.metrics import calibration_error, classification_metrics, reliability_bins
from models.plots import reliability_figure

torch.set_num_threads(1)


@pytest.fixture
def logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (500,), generator=g)
    z = torch.randn(500, 5, generator=g) * 2
    z[torch.arange(250), y[:250]] += 3  # half confidently right, the rest near chance
    return z, y


def test_reliability_bins_reproduce_torchmetrics_ece_and_mce(logits_and_labels):
    z, y = logits_and_labels
    bins = reliability_bins(z, y)
    assert sum(bins.count) == len(y)
    assert bins.ece == pytest.approx(calibration_error(z, y), abs=1e-5)
    gaps = [abs(a - p) for a, p, c in zip(bins.accuracy, bins.confidence, bins.count) if c]
    assert max(gaps) == pytest.approx(calibration_error(z, y, norm="max"), abs=1e-5)


def test_perfectly_calibrated_predictions_have_near_zero_ece():
    g = torch.Generator().manual_seed(1)
    probs = torch.distributions.Dirichlet(torch.ones(4)).sample((20000,))
    y = torch.multinomial(probs, 1, generator=g).squeeze(1)  # labels drawn from the predicted distribution
    assert calibration_error(probs.log(), y) < 0.02


def test_metrics_report_accuracy_and_nll(logits_and_labels):
    z, y = logits_and_labels
    m = classification_metrics(z, y)
    assert m["acc"] == pytest.approx((z.argmax(1) == y).float().mean().item())
    assert m["nll"] == pytest.approx(F.cross_entropy(z, y).item())
    assert all(math.isnan(v) for v in classification_metrics(z[:0], y[:0]).values())


def test_reliability_figure_renders(logits_and_labels):
    z, y = logits_and_labels
    fig = reliability_figure({"a": reliability_bins(z, y), "b": reliability_bins(z * 3, y)})
    assert len(fig.axes) == 2

"""DBPM (Lan et al., ICLR 2024): the mining rule's invariants, the bad-pair series, the run's contract."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from models.methods.representation.dbpm import DBPMParams, PairMemory, pair_losses, run
from models.representation.losses import nt_xent
from models.representation.series import CLEAN, FAULTY, NOISY, bad_pair_series, strong_view
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


def filled_memory(beta_noisy: float = 2.0, beta_faulty: float = 3.0) -> PairMemory:
    memory = PairMemory(epochs=4, num_pairs=50, beta_noisy=beta_noisy, beta_faulty=beta_faulty)
    g = torch.Generator().manual_seed(0)
    for epoch in range(2):
        loss = 3.0 + 0.1 * torch.randn(50, generator=g)
        loss[0], loss[1] = 0.5, 9.0  # one pair fitted far too well, one never fitted
        memory.record(epoch, torch.arange(50), loss)
    return memory


def test_summary_weights_later_epochs_more():
    memory = filled_memory()
    slow = sum((1 + e) / 4 * memory.losses[e] for e in range(2)) / 2
    torch.testing.assert_close(memory.summary(1), slow)


def test_only_pairs_outside_the_band_are_reweighted_by_the_gaussian_density():
    memory = filled_memory()
    noisy, faulty = memory.update(1)
    assert noisy.nonzero().squeeze(1).tolist() == [0] and faulty.nonzero().squeeze(1).tolist() == [1]
    loss = torch.linspace(1.0, 5.0, 50, requires_grad=True)
    out = memory.reweight(loss, torch.arange(50), epoch=2)
    mu, sigma = memory.stats
    density = torch.exp(-0.5 * ((loss.detach() - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    torch.testing.assert_close(out[2:], loss[2:])
    torch.testing.assert_close(out[:2], loss[:2] * density[:2])


def test_warm_up_and_infinite_thresholds_give_plain_simclr():
    loss = torch.rand(50)
    untouched = PairMemory(epochs=4, num_pairs=50, beta_noisy=2.0, beta_faulty=3.0)
    assert torch.equal(untouched.reweight(loss, torch.arange(50), epoch=2), loss)  # no statistics yet
    memory = filled_memory(math.inf, math.inf)
    memory.update(1)
    assert torch.equal(memory.reweight(loss, torch.arange(50), epoch=2), loss)


def test_pair_losses_average_to_nt_xent():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    torch.testing.assert_close(pair_losses(a, b, 0.2).mean(), nt_xent(a, b, 0.2))


def test_series_hold_the_requested_bad_pairs_and_strong_views_permute_segments():
    data = bad_pair_series(200, noisy=0.1, faulty=0.15, seed=0)
    assert data.x.shape == (200, 3, 64)
    assert [(data.kind == k).sum().item() for k in (CLEAN, NOISY, FAULTY)] == [150, 20, 30]
    view = strong_view(data.x[:4], torch.Generator().manual_seed(0), sigma=0.0)
    torch.testing.assert_close(view.sort(-1).values, data.x[:4].sort(-1).values)


def test_run_flags_pairs_evaluates_and_resumes_its_history_identically():
    params = DBPMParams(series=120, epochs=4, warmup=2, batch_size=40, width=16, checkpoint_every=1, plot="pca")
    whole, crashed, resumed = interrupted_and_resumed(run, None, params, seed=0, stop_after=3)
    assert {"noisy_precision", "faulty_precision", "flagged_noisy"} <= {p.name for p in whole.metrics}
    assert 0.0 <= whole.latest("linear_probe_acc") <= 1.0 and whole.latest("rankme") >= 1.0
    for name in ("curves.png", "memory.png", "embedding.png"):
        assert whole.artifacts[name][1].startswith(b"\x89PNG")
    assert crashed.load_checkpoint().step == 3 and "report.json" not in crashed.artifacts
    assert resumed.history("train_loss") == whole.history("train_loss")[3:]
    assert resumed.latest("linear_probe_acc") == whole.latest("linear_probe_acc")


def test_params_are_bounded():
    with pytest.raises(ValidationError):
        DBPMParams(noisy_fraction=0.9)
    with pytest.raises(ValidationError):
        DBPMParams(beta_noisy=0.0)

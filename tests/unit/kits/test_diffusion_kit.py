"""Coloured digits, the evaluation kit's metrics, grids, and resumable base-model training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from models.context import Cancelled, InMemoryRunContext
from models.diffusion.data import NULL, SATURATION_RANGE, coloured_digits, drop_tokens, to_unit
from models.diffusion.evaluation import (
    DigitClassifier,
    clipped_fraction,
    frechet_distance,
    precision_recall,
    saturation,
)
from models.diffusion.grids import image_grid
from models.diffusion.training import PretrainConfig, base_model, base_model_name, train_denoiser

torch.set_num_threads(1)


def test_coloured_digits_have_valid_tokens_and_saturation_in_the_drawn_range():
    d = coloured_digits("test", variants=1, seed=0)
    assert d.images.shape[1:] == (3, 16, 16) and d.images.min() >= -1 and d.images.max() <= 1
    assert (d.tokens >= 0).all() and (d.tokens < torch.tensor(NULL)).all()
    assert SATURATION_RANGE[0] - 0.05 < saturation(to_unit(d.images)) < SATURATION_RANGE[1] + 0.05
    assert clipped_fraction(d.images) == 0.0


def test_token_dropout_nulls_whole_prompts_and_never_the_digit_alone():
    tokens = torch.tensor([[3, 1, 2]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert (drop_tokens(tokens, 1.0, 0.0, g) == torch.tensor(NULL)).all()
    out = drop_tokens(tokens, 0.0, 0.5, g)
    assert (out[:, 0] == 3).all()
    assert 0.45 < (out[:, 1] == NULL[1]).float().mean() < 0.55


def test_grey_images_have_zero_saturation():
    grey = torch.rand(4, 1, 8, 8).repeat(1, 3, 1, 1)
    assert saturation(grey) == 0.0


def test_torchmetrics_frechet_distance_matches_the_closed_form():
    torch.manual_seed(0)
    net = DigitClassifier().eval()
    real, fake = torch.rand(64, 3, 16, 16), torch.rand(64, 3, 16, 16) ** 2
    with torch.no_grad():
        fr, ff = net(real).double().numpy(), net(fake).double().numpy()
    mu1, mu2, s1, s2 = fr.mean(0), ff.mean(0), np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert abs(frechet_distance(net, real, fake) - expected) < 1e-3 * max(1.0, expected)


def test_precision_recall_of_a_set_against_itself_is_one_and_of_a_far_set_is_zero():
    f = torch.randn(50, 8)
    assert precision_recall(f, f) == (1.0, 1.0)
    assert precision_recall(f, f + 100) == (0.0, 0.0)


def test_image_grid_is_a_png_of_the_tiled_size():
    png = image_grid(torch.rand(6, 3, 16, 16), nrow=3, scale=2)
    img = Image.open(io.BytesIO(png))
    assert img.size == ((3 * 17 + 1) * 2, (2 * 17 + 1) * 2)


class StopAfterFirstCheckpoint(InMemoryRunContext):
    """A run that is cancelled right after its first checkpoint (as a worker being stopped)."""

    def save_checkpoint(self, state, step):
        super().save_checkpoint(state, step)
        self.cancel()


def test_interrupted_training_resumes_to_the_same_weights():
    config = PretrainConfig(widths=(8, 16), steps=4, batch_size=8, warmup=1, variants=1, checkpoint_every=2)
    data = coloured_digits("test", variants=1)
    straight = train_denoiser(InMemoryRunContext(), config, data)
    first = StopAfterFirstCheckpoint()
    with pytest.raises(Cancelled):
        train_denoiser(first, config, data)
    assert first.load_checkpoint().step == 2
    second = InMemoryRunContext()
    second.checkpoints = list(first.checkpoints)  # the re-queued attempt sees the stored checkpoint
    resumed = train_denoiser(second, config, data)
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters()):
        torch.testing.assert_close(a, b)


def test_a_cancelled_caller_stops_the_base_model_training_and_caches_nothing(tmp_path):
    """base_model trains in a private context: the caller's progress sees it, and the caller's cancel stops it."""
    config = PretrainConfig(widths=(8, 16), steps=6, batch_size=4, warmup=1, variants=1, checkpoint_every=100)
    ctx = InMemoryRunContext()
    ctx.cache_dir = tmp_path
    reports: list[tuple[int, int]] = []

    def cancel_at_first_report(done: int, total: int, message: str) -> None:
        reports.append((done, total))
        ctx.cancel()

    ctx.on_progress = cancel_at_first_report
    with pytest.raises(Cancelled):
        base_model(ctx, config=config)
    assert reports == [(1, 6)]  # stopped at the next step
    assert not (tmp_path / "diffusion" / base_model_name(config) / ".complete").exists()

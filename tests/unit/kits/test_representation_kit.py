"""The representation kit: InfoNCE family against pytorch-metric-learning, views, evaluation, the trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.utils.inference import CustomKNN

from models.context import Cancelled, InMemoryRunContext
from models.representation.augment import ViewRecipe, random_view
from models.representation.contrastive import ContrastiveSchedule, fit_contrastive, simclr_objective
from models.representation.encoders import ContrastiveEncoder, embed, load_encoder, save_encoder
from models.representation.evaluation import evaluate_embeddings, knn_accuracy, retrieval_metrics, sklearn_knn
from models.representation.losses import multi_positive_info_nce, nt_xent

torch.set_num_threads(1)


@pytest.fixture
def views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(12, 16, generator=g, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(12, 16, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.07, 0.5, 2.0])
def test_nt_xent_equals_pytorch_metric_learning_ntxent(views, tau):
    z1, z2 = views
    labels = torch.arange(len(z1)).repeat(2)  # the two views of image i share label i
    reference = NTXentLoss(temperature=tau)(torch.cat([z1, z2]), labels)
    torch.testing.assert_close(nt_xent(z1, z2, tau), reference, rtol=1e-10, atol=1e-10)


def test_nt_xent_matches_a_slow_per_anchor_loop_and_a_constant_temperature_matrix(views):
    z1, z2 = views
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n, tau = len(z1), 0.3
    slow = []
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        slow.append(-math.log(math.exp(float(z[i] @ z[p]) / tau) / denom))
    torch.testing.assert_close(nt_xent(z1, z2, tau, reduction="none"), torch.tensor(slow, dtype=torch.float64))
    torch.testing.assert_close(
        nt_xent(z1, z2, torch.full((2 * n, 2 * n), tau, dtype=torch.float64)), nt_xent(z1, z2, tau)
    )


def test_multi_positive_loss_ignores_row_shifts_and_reduces_to_nt_xent(views):
    z1, z2 = views
    n = len(z1)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / 0.5
    eye = torch.eye(2 * n, dtype=torch.bool)
    positives = eye.roll(n, dims=1)
    negatives = ~eye & ~positives
    loss = multi_positive_info_nce(logits, positives, negatives)
    torch.testing.assert_close(loss, nt_xent(z1, z2, 0.5))  # one positive each: SimCLR exactly
    shifted = logits + torch.randn(2 * n, 1, dtype=torch.float64) * 5
    torch.testing.assert_close(multi_positive_info_nce(shifted, positives, negatives), loss)


def test_views_are_reproducible_from_the_generator_and_identity_at_zero_strength():
    x = torch.rand(6, 1, 16, 16)
    a = random_view(x, ViewRecipe(), torch.Generator().manual_seed(3))
    b = random_view(x, ViewRecipe(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(random_view(x, ViewRecipe(strength=0.0), torch.Generator()), x, atol=1e-5, rtol=0)


def test_sklearn_knn_agrees_with_pml_custom_knn_on_normalised_embeddings():
    z = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    _, ours = sklearn_knn(z, 5, z, ref_includes_query=True)
    _, theirs = CustomKNN(CosineSimilarity())(z, 5, z, ref_includes_query=True)
    assert torch.equal(ours, theirs)  # on the unit sphere Euclidean and cosine order agree


def test_evaluation_suite_scores_perfect_clusters_perfectly_and_noise_near_chance():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 30)
    centres = rng.normal(size=(5, 10)) * 10
    z = centres[y] + rng.normal(size=(150, 10)) * 0.1
    report = evaluate_embeddings(z, y, z, y)
    assert report.linear_probe_acc == report.knn_acc == report.recall_at_1 == 1.0
    assert report.nmi == pytest.approx(1.0) and report.ari == pytest.approx(1.0)
    assert report.map_at_r == pytest.approx(1.0)
    noise = rng.normal(size=(150, 10))
    assert knn_accuracy(noise, y, rng.normal(size=(150, 10)), y) < 0.4
    retrieval = retrieval_metrics(noise, y)
    assert retrieval["recall_at_1"] == pytest.approx(retrieval["pml_precision_at_1"])
    assert retrieval["recall_at_1"] <= retrieval["recall_at_2"] <= retrieval["recall_at_8"]


def test_encoder_round_trips_through_a_saved_folder(tmp_path):
    model = ContrastiveEncoder(width=8, proj_hidden=8, proj_dim=4)
    x = torch.rand(5, 1, 16, 16)
    body, config = load_encoder(save_encoder(tmp_path / "enc", model))
    assert config["width"] == 8
    torch.testing.assert_close(embed(body, x), embed(model.body, x))


def test_contrastive_training_resumes_identically_and_stops_when_cancelled():
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    schedule = ContrastiveSchedule(epochs=4, batch_size=32, checkpoint_every=1)

    def train(ctx: InMemoryRunContext) -> tuple[ContrastiveEncoder, list]:
        torch.manual_seed(0)
        model = ContrastiveEncoder(width=8, proj_hidden=16, proj_dim=8)
        return model, fit_contrastive(ctx, model, simclr_objective(0.5), x, ViewRecipe(), schedule)

    whole_ctx = InMemoryRunContext(seed=2)
    whole, history = train(whole_ctx)
    crashed = InMemoryRunContext(seed=2)
    crashed.on_progress = lambda done, total, msg: crashed.cancel() if done == 2 else None
    with pytest.raises(Cancelled):
        train(crashed)
    assert crashed.load_checkpoint().step == 2
    resumed = InMemoryRunContext(seed=2)
    resumed.checkpoints = list(crashed.checkpoints)
    model, resumed_history = train(resumed)
    assert resumed_history == history
    for a, b in zip(model.state_dict().values(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

"""The representation kit: InfoNCE family against pytorch-metric-learning, views, evaluation, the trainer, the
shared params and ending of every job, the zero-shot split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import NTXentLoss
from pytorch_metric_learning.utils.inference import CustomKNN

from models.context import Cancelled, InMemoryRunContext
from models.representation.augment import ViewRecipe, random_view
from models.representation.contrastive import ContrastiveSchedule, fit_contrastive, simclr_objective
from models.representation.encoders import ContrastiveEncoder, embed, load_encoder, save_encoder
from models.representation.evaluation import (
    evaluate_embeddings,
    knn_accuracy,
    retrieval_metrics,
    sklearn_knn,
    zero_shot_metrics,
)
from models.representation.job import RepresentationParams, finish_representation_job, headline, history_panels
from models.representation.losses import multi_positive_info_nce, nt_xent
from models.representation.zero_shot import class_balanced_batch, zero_shot_split

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


# -- the shared params and ending of every representation job -------------------------------------------


class TinyJobParams(RepresentationParams):
    pass


def test_representation_params_carry_the_shared_fields_and_give_the_contrastive_schedule():
    params = TinyJobParams(epochs=3, batch_size=64, lr=1e-3, checkpoint_every=1)
    assert {"lr", "batch_size", "weight_decay", "epochs", "checkpoint_every", "width", "plot"} <= set(
        TinyJobParams.model_fields
    )
    assert ContrastiveSchedule.of(params) == ContrastiveSchedule(3, 64, 1e-3, 1e-6, 1)
    assert TinyJobParams().plot == "tsne" and TinyJobParams(plot="none").plot == "none"
    with pytest.raises(ValidationError):
        TinyJobParams(batch_size=1)  # a contrastive batch needs a negative
    with pytest.raises(ValidationError):
        TinyJobParams(plot="umap")


def test_history_panels_group_keys_skip_missing_rows_and_read_x_from_the_rows():
    history = [{"epoch": 2, "loss": 1.0}, {"epoch": 4, "loss": 0.5, "nmi": 0.3, "other": 0.1}]
    panels = history_panels(history, ("loss", "nmi", "absent"), "run", "epoch")
    assert panels == {"loss": {"run": ([2.0, 4.0], [1.0, 0.5])}, "nmi": {"run": ([4.0], [0.3])}}
    grouped = history_panels(history, {"both": ["nmi", "other"]}, "run", "iteration")
    assert grouped == {"both": {"nmi": ([2.0], [0.3]), "other": ([2.0], [0.1])}}  # no "iteration": positions


def test_headline_quotes_the_probe_then_recall_then_rankme():
    assert headline({"linear_probe_acc": 0.91234, "recall_at_1": 0.5}) == "probe 0.912"
    assert headline({"unseen_recall_at_1": 0.75}, prefix="unseen_") == "R@1 0.750"
    assert headline({"rankme": 12.34}) == "RankMe 12.3" and headline({}) == ""


def embeddings(seed: int, n: int = 60) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    return torch.from_numpy((rng.normal(size=(3, 8)) * 5)[y] + rng.normal(size=(n, 8))).float(), y


def test_finish_evaluates_logs_plots_reports_and_registers_a_loadable_encoder():
    ctx = InMemoryRunContext(seed=0)
    encoder = ContrastiveEncoder(width=8, proj_hidden=8, proj_dim=4)
    history = [{"train_loss": 2.0}, {"train_loss": 1.5}]
    scores = finish_representation_job(
        ctx,
        TinyJobParams(plot="pca"),
        method="tiny",
        step=2,
        train=embeddings(0),
        test=embeddings(1),
        metrics={"extra": 7.0},
        history=history,
        curves=("train_loss",),
        title="tiny",
        encoder=encoder,
        report={"note": "text"},
    )
    expected = evaluate_embeddings(*embeddings(0), *embeddings(1), seed=0).metrics()
    assert scores == {**expected, "extra": 7.0}
    assert {p.name: (p.step, p.value) for p in ctx.metrics} == {k: (2, v) for k, v in scores.items()}
    assert {"curves.png", "embedding.png", "report.json"} == set(ctx.artifacts)
    assert json.loads(ctx.artifacts["report.json"][1]) == {**scores, "note": "text"}
    (name,) = ctx.models
    assert name == "tiny-in-memory"
    body, config = load_encoder(ctx.load_model(f"{name}@1"))
    assert config["method"] == "tiny" and config["width"] == 8
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(embed(body, x), embed(encoder.body, x))


def test_finish_zero_shot_prefixes_its_scores_and_none_logs_only_the_methods_own():
    ctx = InMemoryRunContext(seed=0)
    z, y = embeddings(2)
    scores = finish_representation_job(
        ctx, TinyJobParams(plot="none"), method="tiny", step=5, test=(z, y), evaluation="zero-shot", prefix="unseen_"
    )
    assert scores == {f"unseen_{k}": v for k, v in zero_shot_metrics(z.numpy(), y, seed=0).items()}
    assert set(ctx.artifacts) == {"report.json"} and not ctx.models  # no history, no map, no encoder
    only = InMemoryRunContext(seed=0)
    logged = finish_representation_job(only, TinyJobParams(), method="t", step=1, evaluation="none", metrics={"m": 1})
    assert logged == {"m": 1.0}
    with pytest.raises(ValueError, match="train and test"):
        finish_representation_job(only, TinyJobParams(), method="t", step=1, test=(z, y))


def test_finish_publishes_nothing_when_the_job_was_cancelled():
    ctx = InMemoryRunContext(seed=0)
    ctx.cancel()
    train, test, encoder = embeddings(0), embeddings(1), ContrastiveEncoder()
    with pytest.raises(Cancelled):
        finish_representation_job(ctx, TinyJobParams(), method="t", step=1, train=train, test=test, encoder=encoder)
    assert not ctx.metrics and not ctx.artifacts and not ctx.models


def test_zero_shot_split_holds_out_the_unseen_classes_and_batches_are_class_balanced():
    from models.datasets import load_builtin

    data = zero_shot_split(load_builtin("digits"), seen_classes=5, image_size=8)
    assert set(data.y_seen.tolist()) == {0, 1, 2, 3, 4} and set(data.y_unseen.tolist()) == {5, 6, 7, 8, 9}
    assert data.x_seen.shape[1:] == (1, 8, 8) and len(data.x_seen) + len(data.x_unseen) == 1797
    index = class_balanced_batch(data.y_seen, 3, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(data.y_seen[index], minlength=5).tolist()) == [0, 0, 4, 4, 4]
    with pytest.raises(ValueError, match="unseen"):
        zero_shot_split(load_builtin("digits"), seen_classes=10, image_size=8)


def test_a_saved_encoders_config_is_how_its_body_was_built_whatever_the_extra_says(tmp_path):
    model = ContrastiveEncoder(width=8, image_size=32)
    body, config = load_encoder(save_encoder(tmp_path / "enc", model, {"width": 64, "image_size": 16, "lr": 0.1}))
    assert (config["width"], config["image_size"], config["lr"]) == (8, 32, 0.1)
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(embed(body, x), embed(model.body, x))

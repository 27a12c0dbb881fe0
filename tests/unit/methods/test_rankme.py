"""RankMe (Garrido et al., ICML 2023): effective-rank invariants and the evaluate job's contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.representation.rankme import RankMeParams, run
from models.registry import registered_spec
from models.representation.encoders import ContrastiveEncoder, save_encoder
from models.representation.evaluation import rankme

torch.set_num_threads(1)


@pytest.fixture
def z() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)


def test_rankme_is_exp_of_the_entropy_of_normalised_singular_values(z):
    s = np.linalg.svd(z.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert rankme(z) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-12)


def test_rankme_is_invariant_to_rotations_and_scaling(z):
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert rankme(z @ q) == pytest.approx(rankme(z), rel=1e-9)
    assert rankme(37.0 * z) == pytest.approx(rankme(z), rel=1e-9)
    assert rankme(0.01 * z @ q) == pytest.approx(rankme(z), rel=1e-9)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_k_equal_singular_values_give_rank_k_and_bounds_hold(k):
    u, _ = torch.linalg.qr(torch.randn(50, 10, dtype=torch.float64))
    z = u[:, :k] * 4.0  # k orthogonal columns of equal norm
    assert rankme(z) == pytest.approx(k, rel=1e-4)  # ε puts ~1e-5 mass on the zero ones
    collapsed = torch.randn(50, 1, dtype=torch.float64) @ torch.randn(1, 10, dtype=torch.float64)
    assert rankme(collapsed) == pytest.approx(1.0, rel=1e-4)
    assert 1.0 <= rankme(torch.randn(30, 10, dtype=torch.float64)) <= 10.0


def test_rankme_job_on_pixels_logs_the_score_and_the_evaluation_suite():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    run(ctx, RankMeParams(plot="pca", image_size=8))
    assert 1.0 < ctx.latest("rankme") <= 64.0
    assert ctx.latest("linear_probe_acc") > 0.8 and ctx.latest("knn_acc") > 0.8
    assert {"nmi", "ari", "recall_at_1", "recall_at_8", "map_at_r"} <= {p.name for p in ctx.metrics}
    for name in ("embedding.png", "spectrum.png"):
        kind, png = ctx.artifacts[name]
        assert kind == "plot" and png.startswith(b"\x89PNG")
    report = json.loads(ctx.artifacts["report.json"][1])
    assert report["rankme"] == ctx.latest("rankme") and report["model"] == "pixels"
    assert ctx.progress_state[:2] == (3, 3)


def test_rankme_job_scores_a_registered_encoder_and_resumes_from_its_embeddings(tmp_path):
    ds = load_builtin("digits")
    ctx = InMemoryRunContext(dataset=ds, seed=0)
    ref = ctx.register_model("enc", save_encoder(tmp_path / "enc", ContrastiveEncoder(width=16)))
    run(ctx, RankMeParams(model=ref, full_evaluation=False, plot="none"))
    assert 1.0 < ctx.latest("rankme") <= 16.0 and ctx.latest("knn_acc") is None
    assert "embedding.png" not in ctx.artifacts

    resumed = InMemoryRunContext(dataset=ds, seed=0)
    resumed.checkpoints = list(ctx.checkpoints)  # a re-queued attempt: no model needed any more
    run(resumed, RankMeParams(model="missing@1", full_evaluation=False, plot="none"))
    assert resumed.latest("rankme") == ctx.latest("rankme")


def test_cancelled_rankme_job_saves_no_results_and_params_are_bounded():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    ctx.cancel()
    assert not registered_spec(run).invoke(ctx, RankMeParams(plot="none"))
    assert ctx.latest("rankme") is None and not ctx.artifacts and not ctx.checkpoints
    stopped = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    stopped.on_progress = lambda done, total, msg: stopped.cancel() if done == 1 else None
    assert not registered_spec(run).invoke(stopped, RankMeParams(plot="none", image_size=8))
    assert stopped.latest("rankme") is not None and stopped.latest("linear_probe_acc") is None
    assert not stopped.artifacts  # the score was logged, nothing was published
    with pytest.raises(ValidationError):
        RankMeParams(max_samples=1)
    with pytest.raises(ValidationError):
        RankMeParams(split="holdout")

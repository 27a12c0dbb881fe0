"""MatryoshkaKV invariants: Cayley maps are orthogonal; at full rank the model is unchanged for any
orthogonal U and any μ; the PCA init is the top principal directions; nested ranks are prefixes; UᵀU = I after
training steps; the projected cache decodes exactly what the uncached forward computes and holds Σ r bytes."""

from __future__ import annotations

import copy

import pytest
import torch

from models.context import Cancelled, InMemoryRunContext, stop_if_cancelled
from models.llm.kv_cache.matryoshka import (
    KVProjection,
    ProjectedCache,
    cayley,
    load_projection,
    pca_basis,
    project_kv,
    projected,
    save_projection,
)
from models.llm.kv_cache.matryoshka_training import calibrate, greedy_ranks, train_projection
from models.llm.model import build_model, llama_config

torch.set_num_threads(1)
VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return build_model(llama_config("micro", VOCAB), seed=0).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def random_projection(seed: int = 0) -> KVProjection:
    proj = KVProjection(2, 2, 32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return proj


def test_cayley_map_is_orthogonal_with_unit_determinant():
    x = torch.randn(3, 5, 16, 16, dtype=torch.float64)
    u = cayley(x)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(u.transpose(-1, -2) @ u, eye.expand_as(u), atol=1e-10)
    assert torch.allclose(torch.linalg.det(u), torch.ones(3, 5, dtype=torch.float64), atol=1e-10)
    assert torch.equal(cayley(torch.zeros(4, 4)), torch.eye(4))


def test_full_rank_reproduces_the_uncompressed_model_for_any_u_and_mu(model, ids):
    proj = random_projection()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with projected(model, proj):
            out = model(input_ids=ids).logits
    assert torch.allclose(out, reference, atol=1e-4)
    assert model.config._attn_implementation != "matryoshka-kv"  # restored


def test_pca_init_is_the_top_principal_directions():
    g = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    scales = torch.tensor([8.0, 6, 4, 3, 2, 1, 0.5, 0.25])
    samples = (torch.randn(5000, 8, generator=g) * scales) @ rotation.T + 3.0
    mean, basis = pca_basis(samples)
    assert torch.allclose(mean, samples.mean(0), atol=1e-5)
    # column i is ± the i-th principal axis (rotation's column i, by decreasing variance)
    assert torch.allclose((basis.T @ rotation).abs().diagonal(), torch.ones(8), atol=2e-2)
    assert torch.linalg.det(basis) > 0
    proj = KVProjection.from_pca([samples.reshape(1, 1, 5000, 8)] * 2, [samples.reshape(1, 1, 5000, 8)] * 2)
    u_k, _ = proj.bases()
    assert torch.allclose(u_k[0, 0], basis, atol=1e-6)


def test_nested_ranks_are_prefixes_of_the_full_projection(ids):
    proj = random_projection()
    key, value = torch.randn(2, 2, 10, 32), torch.randn(2, 2, 10, 32)
    full_k, full_v = project_kv(proj.layer(0), key, value)
    for r in (4, 12, 20):
        proj.set_ranks(r, r)
        k, v = project_kv(proj.layer(0), key, value)
        assert k.shape[-1] == r and torch.allclose(k, full_k[..., :r], atol=1e-6)
        assert torch.allclose(v, full_v[..., :r], atol=1e-6)


def test_training_keeps_u_orthogonal_and_moves_only_the_projection(model):
    proj = KVProjection(2, 2, 32)
    before = copy.deepcopy(model.state_dict())
    stream = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
    losses = train_projection(model, proj, stream, steps=3, batch_size=2, seq_len=32, lr=1e-2, rank_step=8, seed=0)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert proj.x_k.abs().sum() > 0  # it trained
    u_k, u_v = proj.bases()
    eye = torch.eye(32).expand_as(u_k)
    assert torch.allclose(u_k.transpose(-1, -2) @ u_k, eye, atol=1e-5)
    assert torch.allclose(u_v.transpose(-1, -2) @ u_v, eye, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p in model.parameters():
        p.requires_grad_(True)


def test_projected_cache_decodes_like_the_uncached_forward_and_counts_rank_bytes(model, ids):
    proj = random_projection(1)
    rank_k, rank_v = torch.tensor([[8, 16], [24, 4]]), torch.tensor([[12, 12], [32, 8]])
    proj.set_ranks(rank_k, rank_v)
    with torch.no_grad(), projected(model, proj):
        reference = model(input_ids=ids).logits
        cache = ProjectedCache(proj)
        first = model(input_ids=ids[:, :30], cache=cache).logits
        steps = [model(input_ids=ids[:, t : t + 1], cache=cache).logits for t in range(30, 40)]
    assert torch.allclose(torch.cat([first, *steps], dim=1), reference, atol=1e-4)
    assert cache.layers[0].keys.shape[-1] == 16 and cache.layers[1].values.shape[-1] == 32
    assert cache.kv_bytes() == 2 * 40 * int(rank_k.sum() + rank_v.sum()) * 4


def test_greedy_search_meets_the_budget_in_cuts(model, ids):
    proj = calibrate(model, ids)
    rank_k, rank_v = greedy_ranks(model, proj, ids[:1, :24], fraction=0.75, cut=8)
    total = int(rank_k.sum() + rank_v.sum())
    assert total <= 0.75 * 2 * 2 * 2 * 32 and total > 0.75 * 2 * 2 * 2 * 32 - 8
    assert ((rank_k % 8) == 0).all() and ((rank_v % 8) == 0).all() and (rank_k >= 8).all()
    assert (proj.rank_k == 32).all()  # restored


def test_projection_round_trips_through_a_model_folder(tmp_path):
    proj = random_projection(2)
    tables = {"0.5": (torch.full((2, 2), 16), torch.full((2, 2), 16))}
    save_projection(tmp_path, proj, tables)
    loaded, loaded_tables = load_projection(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(proj.state_dict().values(), loaded.state_dict().values()))
    assert torch.equal(loaded_tables["0.5"][0], tables["0.5"][0])


def test_a_cancel_stops_training_after_the_step_that_saw_it(model):
    proj = KVProjection(2, 2, 32)
    stream = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
    ctx, steps = InMemoryRunContext(), []

    def on_step(step: int, loss: float) -> None:
        steps.append(step)
        ctx.cancel()
        stop_if_cancelled(ctx)

    with pytest.raises(Cancelled):
        train_projection(
            model, proj, stream, steps=5, batch_size=2, seq_len=32, lr=1e-2, rank_step=8, seed=0, on_step=on_step
        )
    assert steps == [0]
    for p in model.parameters():
        p.requires_grad_(True)


def test_job_cancelled_during_training_registers_nothing():
    """Cancelled after its first training step, the job stops there: one logged loss and no registered model."""
    from models.llm.base import base_model_name
    from models.registry import get_method

    class CancelOnFirstLoss(InMemoryRunContext):
        def log(self, step: int, **metrics: float) -> None:
            super().log(step, **metrics)
            if "train_loss" in metrics:
                self.cancel()

    spec = get_method("matryoshka-kv")
    ctx = CancelOnFirstLoss()
    assert not spec.invoke(ctx, {**spec.tiny, "model": base_model_name(smoke=True), "steps": 5})
    assert len(ctx.history("train_loss")) == 1
    assert "matryoshka-kv" not in ctx.models and not ctx.artifacts

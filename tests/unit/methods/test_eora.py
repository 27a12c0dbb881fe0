"""EoRA (Liu et al. 2024): full-rank exactness, optimality of the eigenspace solution against plain SVD,
reduction to SVD for isotropic inputs, the peft adapter, and the job's registration."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from models.context import InMemoryRunContext
from models.llm.folder import load_folder
from models.methods.llm_compression.eora import (
    EoRAParams,
    activation_error,
    compensate,
    eigen_scaling,
    eora_factors,
    peft_adapter,
    run,
    svd_factors,
)
from tests.unit.llm_fixtures import small_corpus

torch.set_num_threads(1)


def covariance(d: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, rank or d, generator=g, dtype=torch.float64) @ torch.randn(
        rank or d, d, generator=g, dtype=torch.float64
    )
    x[:, :2] *= 10.0
    return x.T @ x / len(x)


@pytest.fixture
def delta() -> torch.Tensor:
    return torch.randn(24, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["eora", "svd"])
def test_full_rank_compensation_restores_the_weight_exactly(delta, kind):
    b, a = eora_factors(delta, covariance(32), 24) if kind == "eora" else svd_factors(delta, 24)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-9)


def test_rank_deficient_covariance_is_clamped_and_still_exact_at_full_rank(delta):
    c = covariance(32, rank=10)
    scale, inverse = eigen_scaling(c)
    assert torch.isfinite(inverse).all()
    torch.testing.assert_close(scale @ inverse, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-8)
    b, a = eora_factors(delta, c, 24)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eora_activation_weighted_error_never_exceeds_svd_and_is_the_eckart_young_optimum(delta, seed):
    c = covariance(32, seed)
    root = torch.linalg.cholesky(c)  # any C^½ with C = root rootᵀ gives the same singular values of ΔW·C^½
    tail = torch.linalg.svdvals(delta @ root) ** 2
    for rank in range(1, 25):
        eora, svd = eora_factors(delta, c, rank), svd_factors(delta, rank)
        e_eora, e_svd = activation_error(delta, *eora, c), activation_error(delta, *svd, c)
        assert e_eora <= e_svd * (1 + 1e-9) + 1e-12
        assert e_eora == pytest.approx(tail[rank:].sum().item(), rel=1e-7, abs=1e-9)


def test_isotropic_inputs_make_eora_plain_svd(delta):
    for rank in (1, 5, 12):
        eora_b, eora_a = eora_factors(delta, 2.5 * torch.eye(32, dtype=torch.float64), rank)
        svd_b, svd_a = svd_factors(delta, rank)
        torch.testing.assert_close(eora_b @ eora_a, svd_b @ svd_a, rtol=0, atol=1e-10)


def test_compensated_model_at_full_rank_equals_the_dense_model_and_peft_adapter_matches(smoke_base):
    dense = smoke_base.model
    compressed = copy.deepcopy(dense)
    with torch.no_grad():
        for module in compressed.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_((torch.rand_like(module.weight) > 0.5).float())
    original = copy.deepcopy(compressed)
    ids = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    full = copy.deepcopy(compressed)
    compensate(full, dense, ids, rank=1000, kind="eora")
    for (name, p), q in zip(full.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-5, msg=name)
    result = compensate(compressed, dense, ids, rank=4, kind="eora")
    adapter = peft_adapter(original, result.factors, rank=4)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter(input_ids=ids).logits, compressed(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    assert result.extra_parameters == sum(
        4 * (m.in_features + m.out_features) for m in dense.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )


def test_run_registers_the_compensated_model_with_its_adapter_and_lineage(smoke_base, tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    ctx = InMemoryRunContext(dataset=small_corpus())
    params = EoRAParams(
        model=str(smoke_base.path),
        calibration_windows=2,
        seq_len=32,
        eval_windows=2,
        rank=4,
        compression="wanda",
        sparsity="2:4",
    )
    run(ctx, params)
    (name,) = ctx.models
    folder = ctx.load_model(name)
    meta = json.loads((folder / "crucible-model.json").read_text())
    assert meta["parent"] == str(smoke_base.path) and meta["method"] == "eora"
    assert meta["compressed_from"] == "wanda 2:4" and meta["metrics"]["extra_parameters"] > 0
    assert (folder / "eora-adapter" / "adapter_config.json").exists()
    assert all(ctx.latest(k) > 1 for k in ("val_ppl", "val_ppl_compressed", "val_ppl_parent"))
    assert load_folder(folder).model.config.hidden_size == 64

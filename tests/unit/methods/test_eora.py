"""EoRA (Liu et al. 2024): full-rank exactness, optimality of the eigenspace solution against plain SVD,
reduction to SVD for isotropic inputs, the reference's block order (statistics through the dense block, fed by
compensated predecessors), the peft adapter, and the job's registration."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from models.context import InMemoryRunContext
from models.llm.compression.calibration import block_input_stats, block_linears
from models.llm.compression.oneshot import linear_name, quantize_model
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


def with_block_weights(model: torch.nn.Module, layer: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` whose block `layer` linears carry `weights` (by full module name)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, linear in block_linears(out.model.layers[layer]).items():
            linear.weight.copy_(weights[linear_name(layer, name)])
    return out


def test_block_statistics_are_the_dense_block_fed_by_its_compensated_predecessors(smoke_base):
    """As in the reference `llama_sequential_eigen`: block 1's covariances come from running block 1 with its
    DENSE weights on block 0's COMPENSATED outputs. Gathering them with block 1 already compressed (the order
    this replaced) gives other statistics for every linear after q/k/v, and so other factors."""
    dense = smoke_base.model
    assert len(dense.model.layers) == 2
    compressed = copy.deepcopy(dense)
    quantize_model(compressed, bits=2)
    lowered = {n: m.weight.detach().clone() for n, m in compressed.named_modules() if isinstance(m, torch.nn.Linear)}
    dense_w = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.randint(0, dense.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    result = compensate(compressed, dense, ids, rank=4, kind="eora")
    for layer in (0, 1):
        # blocks < layer as compensated (their final weights), block `layer` dense
        stats = block_input_stats(with_block_weights(compressed, layer, dense_w), ids, layer)
        stale = block_input_stats(with_block_weights(compressed, layer, lowered), ids, layer)
        for name, linear in block_linears(compressed.model.layers[layer]).items():
            full = linear_name(layer, name)
            delta = dense_w[full].double() - lowered[full].double()
            b, a = eora_factors(delta, stats[name].covariance, 4)
            got_b, got_a = result.factors[full]
            torch.testing.assert_close(got_b @ got_a, (b @ a).float(), rtol=1e-3, atol=1e-5, msg=full)
            torch.testing.assert_close(linear.weight, lowered[full] + (b @ a).float(), rtol=1e-5, atol=1e-6, msg=full)
            if name in ("self_attn.o_proj", "mlp.down_proj"):  # downstream of the block's own compressed linears
                old_b, old_a = eora_factors(delta, stale[name].covariance, 4)
                assert not torch.allclose(old_b @ old_a, b @ a, rtol=1e-2, atol=1e-4), full


def test_svd_compensation_needs_no_calibration_statistics(smoke_base):
    dense = smoke_base.model
    compressed = copy.deepcopy(dense)
    quantize_model(compressed, bits=3)
    ids = torch.randint(0, dense.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    other = torch.randint(0, dense.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    a, b = (compensate(copy.deepcopy(compressed), dense, x, rank=3, kind="svd") for x in (ids, other))
    assert all(torch.equal(a.factors[k][0] @ a.factors[k][1], b.factors[k][0] @ b.factors[k][1]) for k in a.factors)


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
    stem = smoke_base.path.name
    assert set(ctx.models) == {f"{stem}-wanda-2of4", f"{stem}-eora-r4"}  # the adapter's base, and the merged model
    folder = ctx.load_model(f"{stem}-eora-r4")
    meta = json.loads((folder / "crucible-model.json").read_text())
    assert meta["parent"] == str(smoke_base.path) and meta["method"] == "eora"
    assert meta["compressed_from"] == "wanda 2:4" and meta["metrics"]["extra_parameters"] > 0
    assert meta["adapter_base"] == f"{stem}-wanda-2of4@1"
    assert all(ctx.latest(k) > 1 for k in ("val_ppl", "val_ppl_compressed", "val_ppl_parent"))
    merged = load_folder(folder).model
    assert merged.config.hidden_size == 64

    # the adapter names the compressed model as its base, and peft applied to that base gives the merged logits
    adapter_config = json.loads((folder / "eora-adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == f"{stem}-wanda-2of4@1"
    base = load_folder(ctx.load_model(adapter_config["base_model_name_or_path"])).model
    assert json.loads((ctx.load_model(f"{stem}-wanda-2of4") / "crucible-model.json").read_text())["stage"].startswith(
        "compressed"
    )
    ids = torch.randint(0, merged.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-3)
        adapted = PeftModel.from_pretrained(base, str(folder / "eora-adapter")).eval()  # wraps `base` in place
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

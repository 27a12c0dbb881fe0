"""The compression toolkit's invariants: N:M and unstructured masks, SparseGPT vs magnitude/Wanda on
calibration data, RTN's half-step bound and torchao parity, calibration statistics, packed bytes, lineage."""

from __future__ import annotations

import json

import pytest
import torch

from models.context import InMemoryRunContext
from models.llm.compression.calibration import block_input_stats
from models.llm.compression.job import CompressionParams, register_compressed, token_sets
from models.llm.compression.oneshot import apply_masks, prune_model, quantize_model
from models.llm.compression.pruning import (
    SparsityPattern,
    nm_mask,
    prune_weight,
    reconstruction_error,
    sparsegpt,
    unstructured_mask,
)
from models.llm.compression.quantization import rtn_quantize, rtn_scales
from models.llm.compression.storage import LinearFormat, linear_bytes, packed_bytes
from models.llm.folder import CausalLM, load_folder
from models.llm.model import build_model, llama_config
from models.llm.tokenizer import train_tokenizer

torch.set_num_threads(1)


def correlated_inputs(d: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant, correlated directions and outlier features, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(d, d, generator=g, dtype=torch.float64)
    spectrum = torch.logspace(1, -2, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ (basis * spectrum[:, None])
    x[:, :3] *= 20.0  # outlier features (Wanda's motivation)
    return x


@pytest.fixture
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    x = correlated_inputs(64)
    return w, x.T @ x


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 16)])
def test_nm_mask_keeps_exactly_n_per_group_of_m(n, m):
    scores = torch.rand(7, 64)
    keep = nm_mask(scores, n, m)
    assert torch.all(keep.reshape(7, -1, m).sum(-1) == n)
    kept_min = torch.where(keep, scores, torch.inf).reshape(7, -1, m).amin(-1)
    dropped_max = torch.where(keep, -torch.inf, scores).reshape(7, -1, m).amax(-1)
    assert torch.all(kept_min >= dropped_max)


def test_unstructured_mask_prunes_the_exact_fraction_per_row_or_layer():
    scores = torch.rand(10, 40)
    assert torch.all((~unstructured_mask(scores, 0.7, per_row=True)).sum(1) == 28)
    keep = unstructured_mask(scores, 0.25, per_row=False)
    assert (~keep).sum() == 100 and scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4"])
def test_sparsegpt_reconstructs_calibration_outputs_better_than_magnitude_and_wanda(layer, pattern):
    w, gram = layer
    p = SparsityPattern.parse(pattern)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned, keep = prune_weight(w, p, method, gram)
        assert torch.all(pruned[~keep] == 0)
        assert (~keep).float().mean().item() == pytest.approx(p.sparsity, abs=1 / 64)  # floor(s·n) per row
        if p.is_nm:
            assert torch.all((pruned != 0).reshape(48, -1, 4).sum(-1) <= 2)
        errors[method] = reconstruction_error(w, pruned, gram)
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"]


def test_sparsegpt_with_isotropic_inputs_is_magnitude_pruning(layer):
    """With XXᵀ ∝ I the OBS update has nothing to compensate with and the saliency is |w|."""
    w, _ = layer
    pruned, keep = sparsegpt(w, 3.0 * torch.eye(64, dtype=torch.float64), SparsityPattern.parse("0.5"))
    magnitude, mag_keep = prune_weight(w, SparsityPattern.parse("0.5"), "magnitude")
    assert torch.equal(keep, mag_keep)
    torch.testing.assert_close(pruned, magnitude, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits,group,symmetric", [(3, 0, False), (4, 16, False), (8, 0, True), (2, 8, True)])
def test_rtn_moves_every_weight_by_at_most_half_a_step(bits, group, symmetric):
    w = torch.randn(16, 64, dtype=torch.float64) * torch.logspace(-2, 1, 16, dtype=torch.float64)[:, None]
    q = rtn_quantize(w, bits, group, symmetric)
    scale, _ = rtn_scales(w, bits, group, symmetric)
    step = scale.expand(-1, -1, group or 64).reshape(16, 64)
    assert torch.all((w - q).abs() <= step / 2 * (1 + 1e-9))
    levels = max(len(torch.unique(row)) for row in q.reshape(-1, group or 64))
    assert levels <= 2**bits


def test_symmetric_int8_rtn_agrees_with_torchao_int8_weight_only():
    torchao = pytest.importorskip("torchao.quantization")
    linear = torch.nn.Linear(64, 32)
    w = linear.weight.detach().clone()
    torchao.quantize_(torch.nn.Sequential(linear), torchao.Int8WeightOnlyConfig())
    theirs = linear.weight.dequantize()
    ours = rtn_quantize(w, 8, symmetric=True)
    scale = rtn_scales(w, 8, symmetric=True)[0].reshape(-1, 1)
    torch.testing.assert_close(linear.weight.scale.reshape(-1, 1), scale, rtol=1e-6, atol=0)
    assert torch.all((ours - theirs).abs() <= scale * 1.001)  # at most one code apart (rounding ties)
    assert (ours == theirs).float().mean() > 0.98


@pytest.fixture(scope="module")
def micro() -> CausalLM:
    from models.datasets import load_builtin

    tok = train_tokenizer(load_builtin("stdlib-code").train["text"][:4], vocab_size=320)
    return CausalLM(build_model(llama_config("micro", len(tok)), seed=0), tok, path=None)


def test_block_statistics_are_the_gram_matrix_of_the_linear_inputs(micro):
    model = micro.model
    ids = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    stats = block_input_stats(model, ids, layer=0, batch_size=2)
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64).double()
    torch.testing.assert_close(stats["self_attn.q_proj"].gram, x.T @ x)
    assert stats["self_attn.q_proj"].count == 48
    assert torch.equal(stats["self_attn.k_proj"].gram, stats["self_attn.v_proj"].gram)
    assert stats["mlp.down_proj"].gram.shape == (172, 172)


@pytest.mark.parametrize("method,pattern", [("wanda", "0.5"), ("sparsegpt", "2:4"), ("magnitude", "0.7")])
def test_prune_model_sparsifies_every_block_linear_and_masks_can_be_reapplied(micro, method, pattern):
    model = build_model(micro.model.config, seed=0)
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(1))
    p = SparsityPattern.parse(pattern)
    masks = prune_model(model, ids, p, method, batch_size=2)
    assert len(masks) == 2 * 7
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        weight = modules[name].weight
        assert torch.all(weight[~keep] == 0) and (~keep).float().mean().item() == pytest.approx(p.sparsity, abs=0.01)
    with torch.no_grad():
        for name in masks:
            modules[name].weight.add_(1.0)
    apply_masks(model, masks)
    assert all(torch.all(modules[n].weight[~k] == 0) for n, k in masks.items())


def test_packed_bytes_count_values_metadata_and_scales(micro):
    assert linear_bytes((8, 16), LinearFormat()) == 8 * 16 * 2
    assert linear_bytes((8, 16), LinearFormat(pattern=SparsityPattern.parse("2:4"))) == 64 * 2 + 64 * 2 / 8
    assert linear_bytes((8, 16), LinearFormat(value_bits=4)) == 8 * 16 / 2 + 8 * 4
    model = build_model(micro.model.config, seed=0)
    dense = packed_bytes(model, {})
    formats = quantize_model(model, bits=4, group_size=16)
    assert dense == 2 * sum(p.numel() for p in model.parameters())
    assert packed_bytes(model, formats) < dense


def test_registered_compressed_model_records_its_parent_and_job(micro):
    ctx = InMemoryRunContext(job_id="job-7")
    ref = register_compressed(ctx, micro, "base@2", "wanda", CompressionParams(), {"val_ppl": 12.5})
    assert ref == "base-wanda@1"
    meta = json.loads((ctx.load_model(ref) / "crucible-model.json").read_text())
    assert meta["parent"] == "base@2" and meta["job_id"] == "job-7" and meta["metrics"] == {"val_ppl": 12.5}
    assert load_folder(ctx.load_model(ref)).lineage["method"] == "wanda"


def test_calibration_blocks_are_consecutive_disjoint_slices_of_the_train_split(micro):
    ctx = InMemoryRunContext()
    params = CompressionParams(calibration_windows=3, seq_len=16, eval_windows=2)
    first, second = (token_sets(ctx, micro, params, calibration_block=b) for b in (0, 1))
    both = token_sets(ctx, micro, params.model_copy(update={"calibration_windows": 6}))
    assert first.calibration.shape == second.calibration.shape == (3, 16)
    assert torch.equal(torch.cat([first.calibration, second.calibration]), both.calibration)
    assert torch.equal(first.evaluation, second.evaluation)  # evaluation never moves

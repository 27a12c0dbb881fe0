"""Progressive gradient flow (Bambhaniya et al. 2024): β = 1 is dense, β = 0 has exactly N nonzeros per group,
gradients pass straight through (MDGF) or with SR-STE's decay, the schedule never rises, the finished model is
a plain N:M HF model, and training resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from models.llm.folder import load_folder, save_folder
from models.llm.model import build_model, llama_config
from models.methods.llm_compression.nm_pgf import NMGradientFlow, PGFParams, beta_at, finalize, run, sparsify
from tests.unit.llm_fixtures import small_corpus
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


def parametrized_linear(recipe: str, n: int = 2, m: int = 8, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = nn.Linear(32, 6, bias=False)
    raw = linear.weight.detach().clone()
    parametrize.register_parametrization(linear, "weight", NMGradientFlow(n, m, recipe))
    return linear, raw


def test_beta_one_is_the_dense_layer():
    linear, raw = parametrized_linear("mdgf-exp")
    linear.parametrizations.weight[0].beta = 1.0
    assert torch.equal(linear.weight, raw)


@pytest.mark.parametrize("recipe,n,m", [("mdgf-exp", 2, 8), ("mdgf-linear", 1, 16), ("srste", 1, 4), ("srste", 3, 8)])
def test_beta_zero_leaves_exactly_n_nonzeros_per_group_of_m(recipe, n, m):
    linear, raw = parametrized_linear(recipe, n, m)
    linear.parametrizations.weight[0].beta = 0.0
    w = linear.weight
    assert torch.all((w != 0).reshape(6, -1, m).sum(-1) == n)
    kept = w != 0
    assert torch.equal(w[kept], raw[kept])  # surviving weights are the largest of each group, unchanged
    smallest_kept = torch.where(kept, raw.abs(), torch.inf).reshape(6, -1, m).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, raw.abs()).reshape(6, -1, m).amax(-1)
    assert torch.all(smallest_kept >= largest_dropped)


def test_mdgf_gradient_passes_straight_through_and_srste_adds_its_decay():
    x = torch.randn(5, 32)
    upstream = torch.randn(5, 6)
    for recipe, beta in (("mdgf-exp", 0.3), ("mdgf-exp", 0.0), ("srste", 0.0)):
        linear, raw = parametrized_linear(recipe)
        flow = linear.parametrizations.weight[0]
        flow.beta = beta
        (linear(x) * upstream).sum().backward()
        grad = linear.parametrizations.weight.original.grad
        straight = upstream.T @ x  # ∂L/∂W̃
        if recipe == "srste":
            keep = linear.weight.detach() != 0
            torch.testing.assert_close(grad, straight + 2e-4 * (~keep) * raw)
        else:
            torch.testing.assert_close(grad, straight)


@pytest.mark.parametrize("recipe", ["mdgf-exp", "mdgf-linear", "srste"])
def test_beta_schedule_never_rises_and_ends_binary(recipe):
    betas = [beta_at(t, 200, recipe) for t in range(200)]
    assert all(b1 >= b2 for b1, b2 in zip(betas, betas[1:]))
    assert all(b == 0.0 for b in betas[170:])
    if recipe == "mdgf-exp":
        assert betas[0] == 1.0 and beta_at(130, 200, recipe) == pytest.approx(0.01)


def test_finished_model_is_a_plain_nm_llama_with_the_same_logits(tmp_path, smoke_base):
    config = llama_config("micro", 300)
    config.intermediate_size = 256
    model = build_model(config, seed=0)
    flows = sparsify(model, "1:16", "1:8", "mdgf-exp")
    ids = torch.randint(0, 300, (2, 12))
    for flow in flows.values():
        flow.beta = 0.0
    with torch.no_grad():
        before = model(input_ids=ids).logits
    finalize(model, flows)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.all((down != 0).reshape(down.shape[0], -1, 16).sum(-1) == 1)
    save_folder(model, smoke_base.tokenizer, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(load_folder(tmp_path / "m").model(input_ids=ids).logits, before)


def test_run_resumes_exactly_and_registers_the_sparse_model(smoke_base):
    params = PGFParams(
        steps=4,
        batch_size=2,
        seq_len=16,
        train_tokens=2000,
        eval_windows=2,
        checkpoint_every=2,
        tokenizer_model=str(smoke_base.path),
    )
    whole, crashed, resumed = interrupted_and_resumed(run, small_corpus(), params, seed=2, stop_after=3)
    assert crashed.load_checkpoint().step == 2 and not crashed.models
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.latest("val_ppl") == whole.latest("val_ppl")
    (name,) = whole.models
    meta = json.loads((whole.load_model(name) / "crucible-model.json").read_text())
    assert meta["method"] == "nm-pgf" and meta["nm_ff"] == "1:16"
    assert meta["metrics"]["linear_density"] == pytest.approx(
        (4 * 1 / 8 * 64 * 64 + 3 * 1 / 16 * 64 * 256) / (4 * 64 * 64 + 3 * 64 * 256)
    )

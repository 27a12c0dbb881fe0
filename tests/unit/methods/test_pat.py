"""PAT (Liu et al. 2024): the model is unchanged at initialisation, the sliced model equals the masked one once
RMSNorm gains are scaled by √(D/D'), the mask schedule and losses behave as in the reference, and the job
registers a genuinely narrower Llama."""

from __future__ import annotations

import json

import pytest
import torch

from models.context import InMemoryRunContext
from models.llm.model import build_model, llama_config
from models.methods.llm_compression.pat import HSM, PATModules, PATParams, SharedMask, run, slice_hidden
from tests.unit.llm_fixtures import small_corpus

torch.set_num_threads(1)


@pytest.fixture
def model():
    return build_model(llama_config("micro", 300), seed=0).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def test_model_is_unchanged_at_initialisation(model):
    with torch.no_grad():
        before = model(input_ids=ids()).logits
        pat = PATModules(model, rank=16, total_steps=100)  # M = 0, W_u = 0, s = 1: m = σ(0) + ½ = 1
        after = model(input_ids=ids()).logits
    assert torch.equal(pat.mask.values(), torch.ones(64))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def perturbed(model, kept: int = 40):
    pat = PATModules(model, rank=16, total_steps=100)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for hsm in pat.sites.values():
            hsm.up.weight.normal_(0, 0.05, generator=g)
            hsm.scale.uniform_(0.5, 1.5, generator=g)
        pat.mask.logits.copy_(torch.randn(64, generator=g))
        order = pat.mask.logits.argsort(descending=True)
        pat.mask.logits[order[:kept]] = pat.mask.logits[order[:kept]].abs() + 0.1
        pat.mask.logits[order[kept:]] = -pat.mask.logits[order[kept:]].abs() - 0.1
    pat.mask.binary, pat.mask.width = True, kept
    return pat


def test_sliced_model_equals_the_masked_model_with_scaled_norm_gains(model):
    pat = perturbed(model)
    with torch.no_grad():
        masked = model(input_ids=ids()).logits
        transforms = {site: hsm.transform(pat.mask.values()) for site, hsm in pat.sites.items()}
    kept = pat.mask.kept(40)
    pat.remove()
    small = slice_hidden(model, kept, transforms)
    assert small.config.hidden_size == 40 and small.model.layers[0].self_attn.q_proj.weight.shape == (64, 40)
    with torch.no_grad():
        sliced = small(input_ids=ids()).logits
        torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)
        for norm in [small.model.norm] + [
            m for layer in small.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
        ]:
            norm.weight.div_((64 / 40) ** 0.5)
        assert (small(input_ids=ids()).logits - masked).abs().max() > 1e-2  # without the √(D/D') gain it differs


def test_mask_schedule_anneals_to_the_binary_mask_and_freezes_late():
    mask = SharedMask(8, total_steps=100)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0, -1.0, 1.0, 0.1, -0.1]))
    taus, biases = zip(*(mask.temperature_and_bias(t) for t in range(0, 100, 10)))
    assert all(a <= b for a, b in zip(taus, taus[1:])) and biases[0] == 0.5 and biases[-1] == 0.0
    mask.step = 79
    assert mask.values().requires_grad
    mask.step = 80
    assert not mask.values().requires_grad  # M frozen after 0.8·T_g
    mask.binary = True
    assert mask.values().tolist() == [0, 0, 1, 1, 0, 1, 1, 0]


def test_width_loss_uses_a_straight_through_count_and_polarises():
    mask = SharedMask(6, total_steps=10)
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([0.5, 0.5, 0.5, -0.5, -0.5, 0.2]))  # 4 kept, target 2
    loss = mask.loss(target=2)
    loss.backward()
    assert loss.item() == pytest.approx(10 * 2 / 2 + ((0.5 - 0.5) ** 2 * 3 + (0.2 - 0.5) ** 2) / 4)
    expected = 10 / 2 + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2 * (0.2 - 0.5) / 4])
    torch.testing.assert_close(mask.logits.grad, expected)


def test_identity_loss_vanishes_for_orthonormal_down_projections():
    hsm = HSM(16, 4)
    with torch.no_grad():
        hsm.down.weight.copy_(torch.linalg.qr(torch.randn(16, 4))[0].T)
    assert hsm.identity_loss().item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("baseline", [False, True])
def test_run_registers_a_narrower_llama(smoke_base, baseline):
    ctx = InMemoryRunContext(dataset=small_corpus())
    run(
        ctx,
        PATParams(
            model=str(smoke_base.path),
            hidden_size=48,
            steps=3,
            batch_size=2,
            calibration_windows=2,
            seq_len=16,
            eval_windows=2,
            train_tokens=2000,
            baseline=baseline,
        ),
    )
    (name,) = ctx.models
    folder = ctx.load_model(name)
    config = json.loads((folder / "config.json").read_text())
    # PAT folds its embedding HSM into the input embedding, so input and output matrices differ; the baseline
    # folds nothing, and a tied base stays tied (one vocabulary matrix on disk, not two)
    assert config["hidden_size"] == 48 and config["tie_word_embeddings"] is baseline
    assert json.loads((folder / "crucible-model.json").read_text())["metrics"]["hidden_size"] == 48

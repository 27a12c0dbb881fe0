"""The sampling core: guidance through the whole loop, per-request state, seeds, folder round trip, 4xx errors."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from models.diffusion.guidance import GuidanceSpec
from models.diffusion.model import DiffusionParts, load_parts, new_parts, save_parts, unet_config
from models.diffusion.sampling import (
    InvalidPromptError,
    SampleRequest,
    UnknownSamplerError,
    UnsupportedGuidanceError,
    UnsupportedNegativePromptError,
    from_clean,
    parse_prompt,
    sample,
    to_clean,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts() -> DiffusionParts:
    torch.manual_seed(0)
    p = new_parts(widths=(8, 16))
    with torch.no_grad():  # random, non-trivial conditioning (an untrained encoder's LayerNorm starts at 1/0)
        for prm in p.prompt_encoder.parameters():
            prm.add_(0.5 * torch.randn_like(prm))
    return p.eval()


def req(**kw) -> SampleRequest:
    base = dict(prompt=[3, 1, None], steps=4, n=3, seed=5)
    base.update(kw)
    return SampleRequest(**base)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_clean_prediction_conversion_round_trips(kind):
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(from_clean(to_clean(out, x, a, kind), x, a, kind), out, atol=1e-5, rtol=1e-5)


def test_cfg_at_scale_one_samples_the_conditional_model(parts):
    plain = sample(parts, req(guidance=GuidanceSpec("none")))
    guided = sample(parts, req(guidance=GuidanceSpec("cfg", 1.0)))
    torch.testing.assert_close(guided.raw, plain.raw, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpm-solver"])
def test_apg_reducing_to_cfg_gives_cfg_images_through_the_whole_loop(parts, sampler):
    cfg = sample(parts, req(sampler=sampler, guidance=GuidanceSpec("cfg", 5.0)))
    apg = sample(parts, req(sampler=sampler, guidance=GuidanceSpec("apg", 5.0, eta=1.0, norm_threshold=math.inf)))
    torch.testing.assert_close(apg.raw, cfg.raw, atol=1e-4, rtol=1e-4)


def test_apg_differs_from_cfg_with_paper_settings(parts):
    cfg = sample(parts, req(guidance=GuidanceSpec("cfg", 5.0)))
    apg = sample(parts, req(guidance=GuidanceSpec("apg", 5.0, eta=0.0, norm_threshold=1.0, momentum=-0.5)))
    assert (apg.raw - cfg.raw).abs().max() > 1e-3
    assert len(apg.diff_norm) == 4 and all(v <= 1.0 + 1e-5 for v in apg.diff_norm)


def test_momentum_state_does_not_leak_between_requests(parts):
    r = req(guidance=GuidanceSpec("apg", 6.0, eta=0.0, norm_threshold=2.0, momentum=-0.5))
    torch.testing.assert_close(sample(parts, r).raw, sample(parts, r).raw)


def test_image_depends_only_on_its_own_seed_not_on_n_or_batching(parts):
    g = GuidanceSpec("apg", 4.0, eta=0.0, momentum=-0.5)
    many = sample(parts, req(n=3, guidance=g))
    assert many.seeds == [5, 6, 7]
    alone = sample(parts, req(n=1, seed=7, guidance=g))
    chunked = sample(parts, req(n=3, max_batch=2, guidance=g))
    torch.testing.assert_close(alone.raw[0], many.raw[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.raw, many.raw, atol=1e-5, rtol=1e-5)


def test_negative_prompt_replaces_the_null_branch(parts):
    g = GuidanceSpec("cfg", 4.0)
    plain = sample(parts, req(guidance=g))
    neg = sample(parts, req(guidance=g, negative_prompt="red"))
    same = sample(parts, req(guidance=g, negative_prompt=[None, None, None]))
    assert (neg.raw - plain.raw).abs().max() > 1e-3
    torch.testing.assert_close(same.raw, plain.raw)


def test_word_prompts_map_to_token_ids():
    null = [10, 6, 3]
    assert parse_prompt("a bold red seven", null) == [7, 0, 2]
    assert parse_prompt("3", null) == [3, 6, 3]
    assert parse_prompt([1, None, 0], null) == [1, 6, 0]
    with pytest.raises(InvalidPromptError) as err:
        parse_prompt("a purple 3", null)
    assert err.value.param == "prompt"
    with pytest.raises(InvalidPromptError):
        parse_prompt([11, 0, 0], null)


def test_invalid_combinations_raise_errors_naming_the_parameter(parts):
    no_null = DiffusionParts(parts.unet, parts.scheduler_config, parts.prompt_encoder, {**parts.info, "null_prob": 0.0})
    with pytest.raises(UnsupportedGuidanceError) as err:
        sample(no_null, req(guidance=GuidanceSpec("cfg", 3.0)))
    assert err.value.param == "guidance"
    assert sample(no_null, req(guidance=GuidanceSpec("none"))).images.shape == (3, 3, 16, 16)
    with pytest.raises(UnsupportedGuidanceError) as err:
        sample(parts, req(sampler="heun", guidance=GuidanceSpec("apg", 3.0)))
    assert err.value.param == "sampler"
    with pytest.raises(UnknownSamplerError):
        sample(parts, req(sampler="plms"))
    with pytest.raises(UnsupportedNegativePromptError):
        sample(parts, req(guidance=GuidanceSpec("none"), negative_prompt="red"))


def test_saved_folder_loads_back_and_samples_identically(parts, tmp_path):
    loaded = load_parts(save_parts(parts, tmp_path / "m"))
    r = req(guidance=GuidanceSpec("apg", 4.0, eta=0.0, momentum=-0.5))
    torch.testing.assert_close(sample(loaded, r).raw, sample(parts, r).raw)
    assert loaded.null_conditioning and loaded.cross_attention


def test_a_plain_diffusers_folder_loads_without_prompt_encoder(tmp_path):
    UNet2DConditionModel(**unet_config((8, 16))).save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    plain = load_parts(tmp_path)
    assert plain.prompt_encoder is None and not plain.null_conditioning
    out = sample(plain, SampleRequest(guidance=GuidanceSpec("none"), steps=2, n=2))
    assert out.images.shape == (2, 3, 16, 16) and 0 <= out.images.min() and out.images.max() <= 1
    with pytest.raises(UnsupportedNegativePromptError):
        sample(plain, SampleRequest(guidance=GuidanceSpec("none"), negative_prompt="red", steps=2, n=1))
    with pytest.raises(UnsupportedGuidanceError):
        sample(plain, SampleRequest(guidance=GuidanceSpec("cfg", 3.0), steps=2, n=1))


def test_a_one_step_student_samples_in_one_unet_call_through_the_core(parts):
    """A model whose info names a one-step timestep (what snoopi registers) is served by the same `sample`:
    x̂₀ = (z − σ_T ε(z, T, c)) / α_T per seed, and CFG combines the one-step outputs of the two prompts."""
    from models.diffusion.model import DiffusionParts
    from models.diffusion.one_step import OneStep
    from models.diffusion.sampling import initial_noise

    one = OneStep.for_schedule(DDPMScheduler.from_config(parts.scheduler_config).alphas_cumprod, 0.05)
    student = DiffusionParts(
        parts.unet,
        parts.scheduler_config,
        parts.prompt_encoder,
        {**parts.info, "one_step": {"timestep": one.timestep, "alpha": one.alpha, "sigma": one.sigma}},
    )
    calls = []
    hook = student.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = sample(student, req(steps=30, guidance=GuidanceSpec("none")))
    finally:
        hook.remove()
    assert len(calls) == 1
    noise = initial_noise(out.seeds, (3, 16, 16))
    cond = student.encode(torch.tensor([[3, 1, student.prompt_encoder.null_tokens[2]]])).expand(3, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(out.raw, one.generate(student.unet, noise, cond))
        null = student.encode(torch.tensor([student.prompt_encoder.null_tokens])).expand(3, -1, -1)
        expected = one.generate(student.unet, noise, null) + 4.0 * (out.raw - one.generate(student.unet, noise, null))
    guided = sample(student, req(guidance=GuidanceSpec("cfg", 4.0)))
    torch.testing.assert_close(guided.raw, expected, atol=1e-5, rtol=1e-5)

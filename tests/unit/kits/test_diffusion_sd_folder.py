"""A Stable Diffusion folder (text_encoder + tokenizer + vae + unet + scheduler, as
StableDiffusionPipeline.save_pretrained writes it) loads through `load_parts` and samples through our
core exactly as diffusers' own pipeline does: the path a GPU deployment takes with a real SD checkpoint,
tested on a tiny randomly initialised one (nothing can be downloaded here)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.diffusion.guidance import GuidanceSpec
from models.diffusion.model import load_parts
from models.diffusion.sampling import (
    SAMPLERS,
    InvalidPromptError,
    SampleRequest,
    SamplingRequestError,
    native_size,
    sample,
    size_step,
)

torch.set_num_threads(1)


def _tiny_clip_tokenizer():
    """Byte-level CLIP BPE with no merges: every character is a token (what the real vocab reduces to)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16), len(vocab)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-sd")
    tokenizer, vocab = _tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd", safe_serialization=True)
    return root / "sd"


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_an_sd_folder_samples_exactly_as_diffusers_pipeline_with_every_sampler(sd_folder, sampler):
    """n = 2 at seed 7 against the pipeline given one generator per image (seeds 7 and 8), which draws each
    image's initial latents and then its step noise (ddpm, euler-ancestral) from that image's generator."""
    parts = load_parts(sd_folder)
    assert parts.text_prompts and parts.vae is not None and parts.null_conditioning
    request = SampleRequest(
        prompt="a red three", guidance=GuidanceSpec("cfg", 5.0), sampler=sampler, steps=4, seed=7, n=2
    )
    ours = sample(parts, request)
    pipe = StableDiffusionPipeline.from_pretrained(
        sd_folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        ["a red three"] * 2,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in ours.seeds],
        output_type="pt",
        height=16,
        width=16,
    ).images
    assert ours.images.shape == (2, 3, 16, 16) and ours.seeds == [7, 8]
    torch.testing.assert_close(ours.images, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "euler-ancestral"])
def test_image_i_of_n_is_the_single_image_at_seed_plus_i_with_stochastic_samplers(sd_folder, sampler):
    parts = load_parts(sd_folder)
    request = SampleRequest(prompt="a red three", guidance=GuidanceSpec("cfg", 5.0), sampler=sampler, steps=4, n=3)
    batch = sample(parts, replace(request, seed=7))
    for i in range(3):
        alone = sample(parts, replace(request, seed=7 + i, n=1))
        torch.testing.assert_close(batch.images[i : i + 1], alone.images, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch.images[0], batch.images[1])


def test_a_latent_model_draws_other_sizes_as_the_pipeline_does_and_refuses_off_step_ones(sd_folder):
    parts = load_parts(sd_folder)
    assert native_size(parts) == 16 and size_step(parts) == 4
    request = SampleRequest(prompt="a red three", guidance=GuidanceSpec("cfg", 5.0), steps=3, seed=2, n=1)
    ours = sample(parts, replace(request, width=24, height=16))
    pipe = StableDiffusionPipeline.from_pretrained(
        sd_folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        "a red three",
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(2)],
        output_type="pt",
        height=16,
        width=24,
    ).images
    assert ours.images.shape == (1, 3, 16, 24)
    torch.testing.assert_close(ours.images, theirs, atol=2e-5, rtol=1e-4)
    with pytest.raises(SamplingRequestError) as err:
        sample(parts, replace(request, width=18))
    assert err.value.param == "width" and "multiple of 4" in str(err.value)


def test_token_id_prompts_are_refused_by_a_text_encoder_model(sd_folder):
    parts = load_parts(sd_folder)
    with pytest.raises(InvalidPromptError) as err:
        sample(parts, SampleRequest(prompt=[3, None, None], steps=1, n=1))
    assert err.value.param == "prompt" and "text prompt" in str(err.value)

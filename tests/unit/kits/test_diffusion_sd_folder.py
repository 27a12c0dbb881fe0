"""A Stable Diffusion folder (text_encoder + tokenizer + vae + unet + scheduler, as
StableDiffusionPipeline.save_pretrained writes it) loads through `load_parts` and samples through our
core exactly as diffusers' own pipeline does: the path a GPU deployment takes with a real SD checkpoint,
tested on a tiny randomly initialised one (nothing can be downloaded here)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.diffusion.guidance import GuidanceSpec
from models.diffusion.model import load_parts
from models.diffusion.sampling import InvalidPromptError, SampleRequest, initial_noise, sample

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


def test_an_sd_folder_samples_exactly_as_diffusers_pipeline(sd_folder):
    parts = load_parts(sd_folder)
    assert parts.text_prompts and parts.vae is not None and parts.null_conditioning
    request = SampleRequest(
        prompt="a red three",
        negative_prompt=None,
        guidance=GuidanceSpec("cfg", 5.0),
        sampler="ddim",
        steps=4,
        seed=7,
        n=2,
    )
    ours = sample(parts, request)
    pipe = StableDiffusionPipeline.from_pretrained(
        sd_folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = initial_noise(ours.seeds, (4, 8, 8))
    theirs = pipe(
        ["a red three"] * 2,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=latents,
        output_type="pt",
        height=16,
        width=16,
    ).images
    assert ours.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours.images, theirs, atol=2e-5, rtol=1e-4)


def test_token_id_prompts_are_refused_by_a_text_encoder_model(sd_folder):
    parts = load_parts(sd_folder)
    with pytest.raises(InvalidPromptError) as err:
        sample(parts, SampleRequest(prompt=[3, None, None], steps=1, n=1))
    assert err.value.param == "prompt" and "text prompt" in str(err.value)

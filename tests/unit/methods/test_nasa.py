"""NASA (SNOOPI Eq. 10): α = 0 is the stock processor, equal prompts scale by (1 − α), per-request install."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from models.diffusion.guidance import GuidanceSpec
from models.diffusion.model import new_parts
from models.diffusion.nasa import NASAProcessor, nasa_attention
from models.diffusion.sampling import SampleRequest, UnsupportedNegativePromptError, sample

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def attn() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()


def test_alpha_zero_equals_the_stock_processor(attn):
    h, ctx, neg = torch.randn(2, 5, 16), torch.randn(2, 3, 8), torch.randn(1, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(NASAProcessor(neg, 0.0)(attn, h, ctx), AttnProcessor2_0()(attn, h, ctx))


def test_negative_equal_to_positive_scales_attention_by_one_minus_alpha(attn):
    h, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    with torch.no_grad():
        z_pos = nasa_attention(attn, h, ctx, ctx, 0.0)
        torch.testing.assert_close(nasa_attention(attn, h, ctx, ctx, 0.3), 0.7 * z_pos)


def test_nasa_in_the_sampling_core_changes_images_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    parts = new_parts(widths=(8, 16)).eval()
    with torch.no_grad():
        for prm in parts.prompt_encoder.parameters():
            prm.add_(0.5 * torch.randn_like(prm))
    before = {k: type(v) for k, v in parts.unet.attn_processors.items()}
    base = dict(prompt="red 3", guidance=GuidanceSpec("none"), steps=3, n=2)
    plain = sample(parts, SampleRequest(**base))
    zero = sample(
        parts, SampleRequest(**base, negative_prompt="blue", attention="nasa", attention_params={"alpha": 0.0})
    )
    steered = sample(parts, SampleRequest(**base, negative_prompt="blue", attention="nasa"))
    torch.testing.assert_close(zero.raw, plain.raw, atol=1e-5, rtol=1e-5)
    assert (steered.raw - plain.raw).abs().max() > 1e-3
    assert {k: type(v) for k, v in parts.unet.attn_processors.items()} == before
    with pytest.raises(UnsupportedNegativePromptError):
        sample(parts, SampleRequest(**base, attention="nasa"))

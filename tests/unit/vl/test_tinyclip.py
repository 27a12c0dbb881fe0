"""TinyCLIP: our block loop is CLIP's forward, its hooks do what they say, its loss is open_clip's, and the
micro model is trained once, cached, registered and reported."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.context import InMemoryRunContext
from models.provenance import recording_inputs, weights_digest
from models.vl.base import tinyclip_folder, tinyclip_name
from models.vl.captions import caption, class_prompt
from models.vl.losses import clip_loss
from models.vl.scenes import render, sample_scenes
from models.vl.tinyclip import build_tinyclip, caption_tokenizer, load_tinyclip, pixel_values, save_tinyclip, tokenize
from models.vl.towers import TowerHooks, encode_image, encode_text
from models.vl.zero_shot import CLASSES, prompt_logits, zero_shot_report


@pytest.fixture(scope="module")
def clip():
    scenes = sample_scenes(200, seed=0)
    rng = np.random.default_rng(0)
    return build_tinyclip("micro", caption_tokenizer([caption(s, rng) for s in scenes]), seed=0)


@pytest.fixture(scope="module")
def batch(clip):
    scenes = sample_scenes(6, seed=1)
    rng = np.random.default_rng(1)
    ids, mask = tokenize(clip.tokenizer, [caption(s, rng) for s in scenes])
    return pixel_values(render(scenes)), ids, mask


def test_the_hook_free_loop_equals_get_image_and_text_features(clip, batch):
    pixels, ids, mask = batch
    assert mask.min() == 0  # the batch is padded
    with torch.no_grad():
        image = encode_image(clip.model, pixels)
        text = encode_text(clip.model, ids, mask)
        hf_image = clip.model.get_image_features(pixel_values=pixels)
        hf_text = clip.model.get_text_features(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(image.features, hf_image.pooler_output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(text.features, hf_text.pooler_output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(image.hidden_states[-1], hf_image.last_hidden_state, atol=1e-6, rtol=1e-5)
    assert len(image.hidden_states) == len(text.hidden_states) == clip.model.config.vision_config.num_hidden_layers + 1


def test_the_text_tower_pools_at_the_end_token(clip, batch):
    _, ids, mask = batch
    assert clip.model.config.text_config.eos_token_id == clip.tokenizer.eos_token_id
    with torch.no_grad():
        out = encode_text(clip.model, ids, mask)
        last = clip.model.text_model.final_layer_norm(out.hidden_states[-1])
    ends = mask.sum(1) - 1
    torch.testing.assert_close(out.pooled, last[torch.arange(len(ids)), ends])


def test_identity_hooks_change_nothing_and_skipping_every_layer_leaves_the_embeddings(clip, batch):
    pixels, ids, mask = batch
    identity = TowerHooks(prompt=lambda i, h: h, skip=lambda i: False, adapter=lambda i, h_in, h_out: h_out)
    with torch.no_grad():
        plain = encode_image(clip.model, pixels)
        hooked = encode_image(clip.model, pixels, identity)
        skipped = encode_image(clip.model, pixels, TowerHooks(skip=lambda i: True))
        text_plain = encode_text(clip.model, ids, mask)
        text_hooked = encode_text(clip.model, ids, mask, identity)
    torch.testing.assert_close(plain.features, hooked.features, atol=0, rtol=0)
    torch.testing.assert_close(text_plain.features, text_hooked.features, atol=0, rtol=0)
    assert all(torch.equal(h, skipped.hidden_states[0]) for h in skipped.hidden_states)
    expected = clip.model.visual_projection(clip.model.vision_model.post_layernorm(skipped.hidden_states[0][:, 0]))
    torch.testing.assert_close(skipped.features, expected)


def test_an_adapter_sees_each_layer_and_a_vision_prompt_may_append_tokens(clip, batch):
    pixels, ids, mask = batch
    seen = []

    def adapter(index: int, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        seen.append(index)
        return h_out + torch.linspace(0, 1, h_out.shape[-1])  # not a constant shift, which LayerNorm removes

    prompts = torch.zeros(1, 4, clip.model.config.vision_config.hidden_size)
    deep = TowerHooks(prompt=lambda i, h: torch.cat([h, prompts.expand(len(h), -1, -1)], 1) if i == 0 else h)
    with torch.no_grad():
        adapted = encode_image(clip.model, pixels, TowerHooks(adapter=adapter))
        prompted = encode_image(clip.model, pixels, deep)
        plain = encode_image(clip.model, pixels)
    assert seen == list(range(clip.model.config.vision_config.num_hidden_layers))
    assert not torch.allclose(adapted.features, plain.features)
    assert prompted.hidden_states[-1].shape[1] == plain.hidden_states[-1].shape[1] + 4
    assert not torch.allclose(prompted.features, plain.features)
    with pytest.raises(ValueError, match="keep the sequence length"):
        encode_text(clip.model, ids, mask, TowerHooks(prompt=lambda i, h: h[:, 1:]))


def _open_clip_loss_module():
    try:
        path = importlib.metadata.distribution("open-clip-torch").locate_file("open_clip/loss.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("open-clip-torch not installed (pip install --no-deps open-clip-torch)")
    # open_clip's package imports torchvision, which fails beside the CPU torch; loss.py needs torch only
    spec = importlib.util.spec_from_file_location("open_clip_loss", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_clip_loss_equals_open_clip_clip_loss():
    reference = _open_clip_loss_module().ClipLoss()
    generator = torch.Generator().manual_seed(0)
    for n, scale in ((2, 1.0), (16, 14.3), (64, 100.0)):
        image = F.normalize(torch.randn(n, 32, generator=generator, dtype=torch.float64), dim=-1)
        text = F.normalize(torch.randn(n, 32, generator=generator, dtype=torch.float64), dim=-1)
        ours, theirs = clip_loss(image, text, scale), reference(image, text, scale)
        assert abs(ours.item() - theirs.item()) < 1e-6


def test_a_saved_tinyclip_reloads_with_the_same_features(clip, batch, tmp_path):
    pixels, ids, mask = batch
    save_tinyclip(clip, tmp_path / "tinyclip")
    again = load_tinyclip(tmp_path / "tinyclip")
    with torch.no_grad():
        torch.testing.assert_close(
            encode_image(again.model, pixels).features, encode_image(clip.model, pixels).features
        )
        torch.testing.assert_close(
            encode_text(again.model, ids, mask).features, encode_text(clip.model, ids, mask).features
        )
    assert tokenize(again.tokenizer, ["a red 3"])[0].tolist() == tokenize(clip.tokenizer, ["a red 3"])[0].tolist()


def test_the_micro_tinyclip_trains_once_then_comes_from_the_cache_and_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    ctx = InMemoryRunContext()
    with recording_inputs() as inputs:
        folder = tinyclip_folder(ctx, smoke=True)
    name = tinyclip_name(smoke=True)
    assert name.startswith("tinyclip-micro-") and inputs == {name: weights_digest(folder)}
    assert weights_digest(ctx.load_model(name)) == weights_digest(folder)
    lineage = (folder / "crucible-lineage.json").read_text()
    assert '"zero_shot"' in lineage and '"train_seconds"' in lineage
    fresh = InMemoryRunContext()
    cached = tinyclip_folder(fresh, smoke=True)  # a new context: found in the cache, not trained again
    assert weights_digest(cached) == weights_digest(folder) and fresh.progress_state == (0, 0, "")
    assert len([p for p in (tmp_path / "cache" / "vl").glob("tinyclip-micro-*") if p.is_dir()]) == 1


def test_zero_shot_logits_are_clip_model_logits_per_image(clip, batch):
    pixels, _, _ = batch
    prompts = [class_prompt(c, d) for c, d in CLASSES[:12]]
    ids, mask = tokenize(clip.tokenizer, prompts)
    with torch.no_grad():
        expected = clip.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(prompt_logits(clip, (pixels + 1) / 2, prompts), expected, atol=1e-5, rtol=1e-5)


def test_the_zero_shot_report_scores_seen_and_novel_classes_in_unit_range(clip):
    report = zero_shot_report(clip, n=20)
    assert set(report) == {f"{s}_{m}_acc" for s in ("seen", "novel") for m in ("class", "colour", "digit")}
    assert all(0.0 <= v <= 1.0 for v in report.values())

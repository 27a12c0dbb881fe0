"""Derived sets are exact by construction: noise masks, CIR edits, near-duplicates, text triplets, videos."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models.vl.captions import mentioned, parse_caption
from models.vl.derived import cir_set, noisy_pairs, text_triplets
from models.vl.scenes import Scene, render, sample_scenes
from models.vl.videos import CLIP_SECONDS, FRAME_NOISE, FRAMES, videos


def _nuisances(scene: Scene) -> tuple:
    return scene.pattern_seed, tuple((o.hue_jitter, o.saturation) for o in scene.objects)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return sample_scenes(400, seed=5, classes="all")


def test_noisy_pairs_move_exactly_the_masked_captions_to_other_scenes(scenes):
    pairs = noisy_pairs(scenes, noise=0.5, seed=0)
    assert pairs.noisy.sum() == 200
    assert (pairs.caption_of[pairs.noisy] != np.flatnonzero(pairs.noisy)).all()
    for i, text in enumerate(pairs.captions):
        parsed = parse_caption(text)
        assert parsed == mentioned(scenes[pairs.caption_of[i]], parsed)
    assert noisy_pairs(scenes, noise=0.0, seed=0).noisy.sum() == 0


def test_a_cir_target_differs_from_its_reference_in_exactly_the_edited_attributes(scenes):
    data = cir_set(scenes, seed=1)
    sizes = set()
    for t in data.triplets:
        sizes.add(len(t.edits))
        assert t.reference.background == t.target.background and _nuisances(t.reference) == _nuisances(t.target)
        for ref, tgt in zip(t.reference.objects, t.target.objects):
            changed = {k for k, v in ref.attributes().items() if tgt.attributes()[k] != v}
            if ref.digit == t.digit:
                assert changed == set(t.edits) and all(tgt.attributes()[k] == v for k, v in t.edits.items())
                assert (ref.source == tgt.source) == ("digit" not in t.edits)
            else:
                assert changed == set() and ref == tgt
        assert t.text.startswith(("make the", "move the", "turn the"))
    assert sizes == {1, 2}


def test_the_gallery_holds_near_duplicates_differing_only_in_handwriting_or_background(scenes):
    data = cir_set(scenes[:100], seed=2)
    assert len(data.gallery) == 300 and (data.duplicate_of[:100] == np.arange(100)).all()
    for scene, owner in zip(data.gallery[100:], data.duplicate_of[100:]):
        target = data.triplets[owner].target
        assert scene.attributes()[0] == target.attributes()[0]
        other_hand = all(a.source != b.source for a, b in zip(scene.objects, target.objects))
        other_background = scene.background != target.background
        assert other_hand != other_background
        if other_hand:
            assert replace(scene, objects=target.objects) == target
    images = render(data.gallery)
    assert not any(torch.equal(images[100 + i], images[owner]) for i, owner in enumerate(data.duplicate_of[100:]))


def test_text_triplets_caption_the_reference_and_the_target(scenes):
    data = cir_set(scenes[:200], seed=3)
    for t, text in zip(data.triplets, text_triplets(data.triplets, seed=0)):
        ref, tgt = parse_caption(text.reference_caption), parse_caption(text.target_caption)
        assert ref == mentioned(t.reference, ref) and tgt == mentioned(t.target, tgt)
        assert text.text == t.text


def test_videos_hold_one_event_in_a_known_span_with_graded_saliency():
    for v in videos(12, seed=0):
        length = len(v.frames)
        start, end = v.span
        assert FRAMES[0] <= length <= FRAMES[1] and 0 <= start < end <= length
        assert (v.saliency[:start] == 0).all() and (v.saliency[end:] == 0).all()
        assert v.saliency[start:end].min() >= 1 and v.saliency[start:end].max() == 4
        assert v.window_seconds == (start * CLIP_SECONDS, end * CLIP_SECONDS)
        before, after = render([v.scene, v.event])
        outside = np.r_[0:start, end:length]
        assert (v.frames[outside] - before).abs().mean() < 2 * FRAME_NOISE
        peak = int(np.argmax(v.saliency))
        assert (v.frames[peak] - after).abs().mean() < 2 * FRAME_NOISE
        newcomer = v.event.objects[-1]
        query = parse_caption(v.query.replace(" appears", "")).objects[0]
        assert query == {"colour": newcomer.colour, "digit": newcomer.digit, "position": newcomer.position}
        assert v.scene.find(newcomer.digit) is None


def test_videos_are_a_function_of_the_seed():
    a, b = videos(2, seed=4), videos(2, seed=4)
    assert all(torch.equal(x.frames, y.frames) and x.query == y.query for x, y in zip(a, b))

"""digit-scenes: deterministic scenes whose captions, questions and pixels agree with their attributes."""

from __future__ import annotations

import colorsys
import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from models.diffusion.data import HUES
from models.vl.captions import MAX_WORDS, answers_yes, caption, class_prompt, mentioned, parse_caption, question
from models.vl.scenes import (
    DIGITS,
    SIZE_PIXELS,
    Scene,
    apart,
    handwriting,
    novel_classes,
    render,
    sample_scenes,
)
from models.vl.tinyclip import CONTEXT, caption_tokenizer, tokenize


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return sample_scenes(2000, seed=3, classes="all")


def test_scenes_and_images_are_a_function_of_the_seed():
    a, b = sample_scenes(50, seed=7), sample_scenes(50, seed=7)
    assert a == b and a != sample_scenes(50, seed=8)
    assert torch.equal(render(a), render(b))


def test_novel_classes_are_a_balanced_half_never_seen_in_pretraining():
    novel = novel_classes()
    assert len(novel) == 30
    assert set(Counter(c for c, _ in novel).values()) == {5}  # each colour misses five digits
    assert set(Counter(d for _, d in novel).values()) == {3}  # each digit misses three colours
    seen = sample_scenes(500, seed=0, classes="seen")
    assert all((o.colour, o.digit) not in novel for s in seen for o in s.objects)
    held_out = sample_scenes(200, seed=0, classes="novel")
    assert all((o.colour, o.digit) in novel for s in held_out for o in s.objects)


def test_objects_have_distinct_digits_in_cells_apart_and_hands_of_their_split(scenes):
    test_hands = {int(i) for d in DIGITS for i in handwriting("test")[d]}
    train_hands = {int(i) for d in DIGITS for i in handwriting("train")[d]}
    assert not test_hands & train_hands
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes:
        assert len({o.digit for o in s.objects}) == len(s.objects)
        assert all(apart(a.position, b.position) for a, b in itertools.combinations(s.objects, 2))
        assert all(o.source in train_hands for o in s.objects)


def test_a_lone_digit_is_painted_in_its_cell_size_and_hue():
    for s in sample_scenes(60, seed=1, counts=(1.0,)):
        s = Scene(s.objects, background=0)  # plain black: every lit pixel is ink
        obj = s.objects[0]
        image = render([s])[0]
        lit = torch.nonzero(image.amax(0) > 0.3)
        row, col = divmod(obj.position, 3)
        centre = (torch.tensor([row, col]) * 2 + 1) * 32 / 6
        assert (lit.float().mean(0) - centre).abs().max() < 6
        assert (lit.amax(0) - lit.amin(0)).max() < SIZE_PIXELS[obj.size]
        r, g, b = image[:, image.amax(0) > 0.6].mean(1).tolist()
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        assert min(abs(hue - HUES[obj.colour]), 360 - abs(hue - HUES[obj.colour])) < 15


def test_captions_parse_back_to_the_scene_attributes(scenes):
    rng = np.random.default_rng(0)
    for s in scenes:
        for detail in (0.0, 0.6, 1.0):
            text = caption(s, rng, detail)
            parsed = parse_caption(text)
            assert len(parsed.objects) == len(s.objects), text
            assert parsed == mentioned(s, parsed), text
            assert all({"colour", "digit"} <= set(o) for o in parsed.objects)
            assert len(text.replace(",", " ,").split()) <= MAX_WORDS


def test_a_caption_without_colours_names_the_digits_alone(scenes):
    rng = np.random.default_rng(4)
    for s in scenes[:300]:
        parsed = parse_caption(caption(s, rng, detail=0.0, colour=False))
        assert parsed.objects == tuple({"digit": o.digit} for o in s.objects)


def test_a_fully_detailed_single_digit_caption_names_every_attribute():
    s = sample_scenes(1, seed=0, counts=(1.0,))[0]
    parsed = parse_caption(caption(s, np.random.default_rng(0), detail=1.0))
    assert parsed.objects[0] == s.objects[0].attributes()


def test_every_caption_fits_the_text_context_with_its_end_token(scenes):
    rng = np.random.default_rng(1)
    texts = [caption(s, rng, detail=1.0) for s in scenes]
    tokenizer = caption_tokenizer(texts)
    ids, mask = tokenize(tokenizer, texts)
    assert ids.shape[1] <= CONTEXT
    assert (ids[torch.arange(len(ids)), mask.sum(1) - 1] == tokenizer.eos_token_id).all()
    assert (ids == tokenizer.eos_token_id).sum(1).eq(1).all()  # no start token: CLIP pools at the only end token
    assert ids.shape[1] >= 12


def test_questions_are_answered_by_the_scene_and_half_say_yes(scenes):
    rng = np.random.default_rng(2)
    asked = [(s, question(s, rng)) for s in scenes]
    for s, q in asked:
        assert parse_caption(q.text).objects[0] == q.asks, q.text
        assert q.answer == answers_yes(s, q.asks)
    assert 0.45 < np.mean([q.answer for _, q in asked]) < 0.55


def test_class_prompts_are_the_minimal_captions():
    assert class_prompt(0, 3) == "a red 3"
    assert class_prompt(2, 8) == "a green 8"
    assert parse_caption(class_prompt(5, 1)).objects == ({"colour": 5, "digit": 1},)

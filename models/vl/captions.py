"""Template captions with synonyms, the parser that reads them back, and yes/no questions.

A caption names every object of a scene in order as "a [size] [thickness] colour digit [at the
position]" (joined by ", " and " and "), optionally after a prefix ("a photo of") and before
"on a <background> background"; each word is drawn from its attribute's synonyms. The optional
parts are dropped, at random, until the caption fits `MAX_WORDS` (the text tower's 24-token
context, one token per word under the caption BPE, minus the end token). Colour and digit are
always named, so every caption identifies the scene's (colour, digit) classes.

`parse_caption` inverts `caption` exactly: each phrase maps back to one attribute value (the
synonym tables are disjoint), so a parsed caption equals the mentioned part of the scene's
attributes, which the tests pin over thousands of scenes. Questions ("is there a red 3?", "is the 7
large?") are the parser's vocabulary in another order, answered from the scene's attributes, with
yes and no equally likely.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.diffusion.data import COLOURS
from models.vl.scenes import BACKGROUNDS, Scene

DIGIT_WORDS = tuple(
    (str(d), name) for d, name in enumerate("zero one two three four five six seven eight nine".split())
)
COLOUR_WORDS = (("red", "scarlet"), ("yellow", "golden"), ("green", "emerald"), ("cyan", "turquoise"),
                ("blue", "azure"), ("magenta", "pink"))  # fmt: skip
SIZE_WORDS = (("small", "little", "tiny"), ("large", "big"))
THICKNESS_WORDS = (("thin", "light"), ("regular", "normal"), ("bold", "thick", "heavy"))
POSITION_WORDS = (
    ("top left", "upper left"), ("top", "top middle"), ("top right", "upper right"),
    ("left", "middle left"), ("centre", "middle"), ("right", "middle right"),
    ("bottom left", "lower left"), ("bottom", "bottom middle"), ("bottom right", "lower right"),
)  # fmt: skip
BACKGROUND_WORDS = (("black", "plain", "dark"), ("noisy", "grainy"), ("striped", "lined"), ("checkered", "chequered"))
PREFIXES = ("a photo of", "an image of", "a picture of")
MAX_WORDS = 22
OPTIONAL = ("size", "thickness", "position")
assert len(COLOUR_WORDS) == len(COLOURS) and len(BACKGROUND_WORDS) == len(BACKGROUNDS)


def _lookup(table: Sequence[Sequence[str]]) -> dict[str, int]:
    return {word: value for value, words in enumerate(table) for word in words}


WORD_TABLES = {
    "digit": _lookup(DIGIT_WORDS),
    "colour": _lookup(COLOUR_WORDS),
    "size": _lookup(SIZE_WORDS),
    "thickness": _lookup(THICKNESS_WORDS),
    "position": _lookup(POSITION_WORDS),
}
BACKGROUND_LOOKUP = _lookup(BACKGROUND_WORDS)
# longest phrases first, so "top left" is read before "top"
_PHRASE = re.compile(
    r"\b(?:" + "|".join(sorted((re.escape(w) for t in WORD_TABLES.values() for w in t), key=len, reverse=True)) + r")\b"
)
_BACKGROUND = re.compile(r" on an? (\w+) background$")


@dataclass(frozen=True)
class ParsedCaption:
    objects: tuple[dict[str, int], ...]
    background: int | None = None


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[int(rng.integers(len(words)))]


def with_article(words: Sequence[str]) -> str:
    """ "a …" or "an …" by the first word's first letter."""
    return ("an " if words[0][0] in "aeiou8" else "a ") + " ".join(words)


def _object_phrase(attrs: dict[str, int], shown: set[str], rng: np.random.Generator) -> str:
    words = []
    if "size" in shown:
        words.append(_pick(rng, SIZE_WORDS[attrs["size"]]))
    if "thickness" in shown:
        words.append(_pick(rng, THICKNESS_WORDS[attrs["thickness"]]))
    if "colour" in shown:
        words.append(_pick(rng, COLOUR_WORDS[attrs["colour"]]))
    words.append(_pick(rng, DIGIT_WORDS[attrs["digit"]]))
    if "position" in shown:
        words += ["at the", _pick(rng, POSITION_WORDS[attrs["position"]])]
    return with_article(words)


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: np.random.Generator, detail: float = 0.6, colour: bool = True) -> str:
    """One random caption: each optional part kept with probability `detail`, then dropped until it fits;
    `colour=False` leaves the colours out ("a 3 and a five": digits alone)."""
    objects = [o.attributes() for o in scene.objects]
    shown = [{a for a in OPTIONAL if rng.random() < detail} | ({"colour"} if colour else set()) for _ in objects]
    prefix = _pick(rng, PREFIXES) + " " if rng.random() < detail / 2 else ""
    background = rng.random() < detail / 2
    while True:
        body = _join([_object_phrase(a, s, rng) for a, s in zip(objects, shown)])
        text = prefix + body
        if background:
            text += f" on {with_article([_pick(rng, BACKGROUND_WORDS[scene.background])])} background"
        if len(text.replace(",", " ,").split()) <= MAX_WORDS:
            return text
        if prefix:
            prefix = ""
        elif background:
            background = False
        else:  # drop one optional attribute of the most detailed object
            richest = max(range(len(shown)), key=lambda i: len(shown[i] & set(OPTIONAL)))
            shown[richest].discard(next(a for a in OPTIONAL if a in shown[richest]))


def class_prompt(colour: int, digit: int) -> str:
    """The canonical zero-shot prompt of a (colour, digit) class, e.g. "a red 3"."""
    return with_article([COLOUR_WORDS[colour][0], DIGIT_WORDS[digit][0]])


def digit_prompt(digit: int) -> str:
    """The zero-shot prompt of a digit alone, e.g. "a 3" (the colour-free captions' form)."""
    return with_article([DIGIT_WORDS[digit][0]])


def parse_caption(text: str) -> ParsedCaption:
    """The attributes a caption mentions: one dict per object phrase (in order) and the background."""
    background = None
    match = _BACKGROUND.search(text)
    if match:
        background = BACKGROUND_LOOKUP[match.group(1)]
        text = text[: match.start()]
    objects = []
    for phrase in re.split(r", | and ", text):
        found: dict[str, int] = {}
        for word in _PHRASE.findall(phrase):
            attribute = next(a for a, t in WORD_TABLES.items() if word in t)
            found[attribute] = WORD_TABLES[attribute][word]
        if found:
            objects.append(found)
    return ParsedCaption(tuple(objects), background)


def mentioned(scene: Scene, parsed: ParsedCaption) -> ParsedCaption:
    """The scene's attributes restricted to what `parsed` mentions (equal to `parsed` for its own caption)."""
    objects = tuple({k: o.attributes()[k] for k in p} for o, p in zip(scene.objects, parsed.objects))
    return ParsedCaption(objects, scene.background if parsed.background is not None else None)


# -- yes/no questions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    text: str
    answer: bool
    asks: dict[str, int] = field(default_factory=dict)  # the attributes one object must have for "yes"


def _ask(asks: dict[str, int], rng: np.random.Generator) -> str:
    digit = _pick(rng, DIGIT_WORDS[asks["digit"]])
    if "colour" in asks:
        return f"is there {with_article([_pick(rng, COLOUR_WORDS[asks['colour']]), digit])}?"
    if "size" in asks:
        return f"is the {digit} {_pick(rng, SIZE_WORDS[asks['size']])}?"
    if "thickness" in asks:
        return f"is the {digit} {_pick(rng, THICKNESS_WORDS[asks['thickness']])}?"
    return f"is the {digit} at the {_pick(rng, POSITION_WORDS[asks['position']])}?"


def answers_yes(scene: Scene, asks: dict[str, int]) -> bool:
    return any(all(o.attributes()[k] == v for k, v in asks.items()) for o in scene.objects)


def question(scene: Scene, rng: np.random.Generator) -> Question:
    """A yes/no question about one attribute of a digit, "yes" with probability ½."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    attribute = ("colour", "size", "thickness", "position")[int(rng.integers(4))]
    truth = obj.attributes()[attribute]
    want_yes = bool(rng.random() < 0.5)
    table = WORD_TABLES[attribute]
    choices = sorted({v for v in table.values() if (v == truth) == want_yes})  # digits are distinct in a scene
    asks = {"digit": obj.digit, attribute: int(choices[int(rng.integers(len(choices)))])}
    return Question(_ask(asks, rng), answers_yes(scene, asks), asks)

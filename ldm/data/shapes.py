"""The shapes world: procedurally generated scenes whose truth is known exactly, with English and Japanese captions.

A scene is 1-3 flat shapes (circle, square, upright triangle) in six palette colours and two sizes on a white,
black or gray background, never touching. Every scene carries its scene graph, so a generated image can be
scored against the prompt that asked for it (`ldm.evaluation`). Geometry is defined on a 64-pixel canvas and
scaled to any other size.

Three colour-shape pairs never appear in training images or captions (`HELD_OUT`); asking for them tests
compositional generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
import re
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {
    "red": (230, 25, 45),
    "green": (40, 180, 75),
    "blue": (30, 90, 220),
    "yellow": (250, 215, 30),
    "purple": (145, 50, 180),
    "orange": (245, 130, 35),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "circle"), ("green", "square")})

CANVAS = 64                                 # the geometry below is in pixels of a 64-pixel canvas
HALF_EXTENT = {"small": 6.0, "large": 12.0}  # half the bounding-box side of a shape
MIN_GAP = 3.0                                # closest two bounding boxes may come
SUPERSAMPLING = 4                            # edges are antialiased; interiors keep the exact palette colours

JA_COLORS = {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の", "orange": "オレンジの"}
JA_SHAPES = {"circle": "丸", "square": "四角", "triangle": "三角"}
JA_SIZES = {"small": "小さい", "large": "大きい"}
JA_BACKGROUNDS = {"white": "白い", "black": "黒い", "gray": "灰色の"}
JA_RELATIONS = {"left of": "左", "right of": "右", "above": "上", "below": "下"}
EN_RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
EN_NUMBERS = {2: "two", 3: "three"}
JA_NUMBERS = {2: "二つ", 3: "三つ"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float = CANVAS / 2  # centre, in pixels of the 64-pixel canvas
    y: float = CANVAS / 2

    @property
    def half_extent(self) -> float:
        return HALF_EXTENT[self.size]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]


# ---------------------------------------------------------------------------------------------------- rendering

def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """Draw the scene at size x size pixels (antialiased edges, exact palette colours inside each shape)."""
    scale = size * SUPERSAMPLING / CANVAS
    canvas = Image.new("RGB", (size * SUPERSAMPLING,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x, y, r = obj.x * scale, obj.y * scale, obj.half_extent * scale
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
        elif obj.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=color)
    return canvas.resize((size, size), Image.BOX)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1], the range the autoencoder works in."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------- relations

def relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """Where a lies relative to b, when one axis clearly dominates (else None: the pair is ambiguous)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def lies(a, where: str, b, margin: float = 0.0) -> bool:
    """Whether a lies `where` relative to b by centres, the looser rule ShapeEval scores with: the offset along the
    direction points the right way and is at least as long as the offset across it, both by `margin` pixels
    (negative: a tolerance). Takes anything with x and y (scene or detected objects)."""
    dx, dy = a.x - b.x, a.y - b.y
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[where]
    return along > margin and along - abs(across) >= margin


def touching(a: ShapeObject, b: ShapeObject) -> bool:
    """Whether the bounding boxes of a and b come closer than MIN_GAP (the world never draws such a pair)."""
    reach = a.half_extent + b.half_extent + MIN_GAP
    return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


# ------------------------------------------------------------------------------------------------- sampling

SCENE_KINDS = {"single": 0.2, "pair": 0.4, "pair_same": 0.1, "triple_same": 0.1, "triple": 0.2}


def allowed_pairs(held_out: frozenset = HELD_OUT) -> list[tuple[str, str]]:
    return [(color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in held_out]


def sample_scene(rng: np.random.Generator, held_out: frozenset = HELD_OUT,
                 scene_kinds: dict[str, float] = SCENE_KINDS) -> Scene:
    """A random scene of a kind drawn with the `scene_kinds` weights; two-object scenes always have a clear spatial
    relation so their captions can state it."""
    pairs = allowed_pairs(held_out)
    kind = _draw_kind(rng, scene_kinds)
    count = {"single": 1, "pair": 2, "pair_same": 2, "triple_same": 3, "triple": 3}[kind]
    same = kind.endswith("_same")
    while True:
        first = pairs[rng.integers(len(pairs))]
        looks = [first if same else pairs[rng.integers(len(pairs))] for _ in range(count)]
        if not same and count > 1 and len(set(looks)) == 1:
            continue  # "two different objects" must differ in colour or shape
        sizes = [SIZES[rng.integers(2)] for _ in range(count)]
        objects = place(rng, [ShapeObject(shape, color, size) for (color, shape), size in zip(looks, sizes)])
        if objects is not None and (count != 2 or relation(*objects) is not None):
            background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
            return Scene(background, tuple(objects))


def check_scene_kinds(scene_kinds: dict[str, float]) -> dict[str, float]:
    weights = list(scene_kinds.values())
    if set(scene_kinds) - set(SCENE_KINDS) or not all(isinstance(w, (int, float)) and w >= 0 for w in weights) \
            or sum(weights) <= 0:
        raise ValueError(f"scene_kinds must map some of {list(SCENE_KINDS)} to non-negative weights, e.g. "
                         f"{{pair: 0.6, single: 0.4}}; got {dict(scene_kinds)}")
    return dict(scene_kinds)


def _draw_kind(rng: np.random.Generator, scene_kinds: dict[str, float]) -> str:
    kinds, weights = list(scene_kinds), np.array(list(scene_kinds.values()), dtype=float)
    return kinds[rng.choice(len(kinds), p=weights / weights.sum())]


def place(rng: np.random.Generator, objects: list[ShapeObject], tries: int = 50) -> list[ShapeObject] | None:
    """The objects at random positions inside the canvas, none touching another; None if they do not fit."""
    placed: list[ShapeObject] = []
    for obj in objects:
        for _ in range(tries):
            low, high = obj.half_extent + 1, CANVAS - obj.half_extent - 1
            x, y = (round(float(value), 1) for value in rng.uniform(low, high, size=2))
            candidate = ShapeObject(obj.shape, obj.color, obj.size, x, y)
            if not any(touching(candidate, other) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return placed


# ------------------------------------------------------------------------------------------------- captions

def object_phrase(obj: ShapeObject, language: str, with_size: bool) -> str:
    """'a large red circle' / '大きい赤い丸'."""
    if language == "ja":
        return (JA_SIZES[obj.size] if with_size else "") + JA_COLORS[obj.color] + JA_SHAPES[obj.shape]
    words = [obj.size, obj.color, obj.shape] if with_size else [obj.color, obj.shape]
    return " ".join([article(words[0]), *words])


def article(word: str) -> str:
    """'an' before a vowel ('an orange'), 'a' otherwise."""
    return "an" if word[0] in "aeiou" else "a"


def count_phrase(obj: ShapeObject, count: int, language: str) -> str:
    """'two yellow triangles' / '黄色い三角が二つ'."""
    if language == "ja":
        return f"{JA_COLORS[obj.color]}{JA_SHAPES[obj.shape]}が{JA_NUMBERS[count]}"
    return f"{EN_NUMBERS[count]} {obj.color} {obj.shape}s"


def relation_phrase(a: ShapeObject, where: str, b: ShapeObject, language: str, with_size: bool) -> str:
    """'a red circle to the left of a blue square' / '青い四角の左に赤い丸' (a is where relative to b)."""
    first, second = object_phrase(a, language, with_size), object_phrase(b, language, with_size)
    if language == "ja":
        return f"{second}の{JA_RELATIONS[where]}に{first}"
    return f"{first} {EN_RELATIONS[where]} {second}"


def _relation_in(caption: str) -> tuple[str, str, str] | None:
    """(relation, its words as the caption writes them, language) for a relation caption, else None."""
    for where in RELATIONS:
        english, japanese = f" {EN_RELATIONS[where]} ", f"の{JA_RELATIONS[where]}に"
        if english in caption:
            return where, english, "en"
        if japanese in caption:
            return where, japanese, "ja"
    return None


class RelationTokenLabels:
    """Labels for the text transformer's auxiliary loss (`token_labels:` in a text-to-image config).

    For a relation caption it returns (the caption up to and including the relation words, the side on which the
    object named after them lies relative to the one named before, as an index into RELATIONS); None otherwise.
    'a red circle to the left of a blue square' -> ('a red circle to the left of', 'right of'): the square is
    named last and lies right of the circle. '青い四角の左に赤い丸' -> ('青い四角の左に', 'left of'). The tokens after
    the prefix must let a linear head tell the side, so the encoder cannot drop the relation word.
    """

    classes = len(RELATIONS)

    def __call__(self, caption: str) -> tuple[str, int] | None:
        found = _relation_in(caption)
        if found is None:
            return None
        where, words, language = found
        if language == "en":  # "A where B": B lies opposite
            return caption[:caption.index(words) + len(words) - 1], RELATIONS.index(OPPOSITE[where])
        return caption[:caption.index(words) + len(words)], RELATIONS.index(where)  # "Bの...にA": A lies where


class OppositeRelation:
    """A relation caption with the opposite relation ('... to the right of ...' for '... to the left of ...'),
    None for other captions: a caption that the image contradicts only by where its objects lie (for the
    `caption_contrast:` loss of a text-to-image config)."""

    def __call__(self, caption: str) -> str | None:
        found = _relation_in(caption)
        if found is None:
            return None
        where, words, language = found
        opposite = OPPOSITE[where]
        swapped = f" {EN_RELATIONS[opposite]} " if language == "en" else f"の{JA_RELATIONS[opposite]}に"
        return caption.replace(words, swapped, 1)


class OtherCount:
    """A caption that counts identical objects ('two red circles', '赤い丸が三つ') with the other count, None for
    other captions: a caption that the image contradicts only by how many objects of a look it shows."""

    def __call__(self, caption: str) -> str | None:
        for numbers, boundary in ((EN_NUMBERS, r"\b"), (JA_NUMBERS, "")):  # Japanese has no spaces to bound a word
            other = {numbers[2]: numbers[3], numbers[3]: numbers[2]}
            pattern = f"{boundary}({'|'.join(other)}){boundary}"
            if re.search(pattern, caption):
                return re.sub(pattern, lambda found: other[found.group(1)], caption, count=1)
        return None


_EN_LOOK = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})")
_JA_LOOK = re.compile(f"({'|'.join(JA_COLORS.values())})({'|'.join(JA_SHAPES.values())})")
_JA_COLOR_NAMES = {word: color for color, word in JA_COLORS.items()}
_JA_SHAPE_NAMES = {word: shape for shape, word in JA_SHAPES.items()}


def _looks(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order, English or Japanese."""
    if english := _EN_LOOK.findall(caption):
        return english
    return [(_JA_COLOR_NAMES[color], _JA_SHAPE_NAMES[shape]) for color, shape in _JA_LOOK.findall(caption)]


def _exchange(caption: str, words: dict[str, str]) -> str:
    """Every word of `words` replaced by its value at once, English articles agreeing ('an orange', 'a red')."""
    changed = re.sub("|".join(map(re.escape, words)), lambda found: words[found.group(0)], caption)
    return re.sub(r"\b(?:a|an) (\w+)", lambda found: f"{article(found.group(1))} {found.group(1)}", changed)


def _stable_choice(options: list, caption: str):
    """One of `options`, the same for the same caption on every run and machine (no hidden randomness)."""
    return options[zlib.crc32(caption.encode()) % len(options)]


class OtherColors:
    """A caption whose image is contradicted only by which colour each object has: the first two colours it names
    exchanged ('a blue circle and a red square' for 'a red circle and a blue square'), or where that would say
    the same (two circles) or name a held-out pair, its first colour replaced by one it does not name ('two green
    circles' for 'two red circles'). None when it names no colour. Never a held-out colour-shape pair: they stay
    out of every training caption."""

    def __call__(self, caption: str) -> str | None:
        looks = _looks(caption)
        named = list(dict.fromkeys(color for color, _ in looks))
        if not named:
            return None

        def recolored(swap: dict[str, str]) -> list[tuple[str, str]]:
            return [(swap.get(color, color), shape) for color, shape in looks]

        def allowed(swap: dict[str, str]) -> bool:
            after = recolored(swap)
            return not HELD_OUT & set(after) and sorted(after) != sorted(looks)

        exchange = {named[0]: named[1], named[1]: named[0]} if len(named) >= 2 else {}
        if exchange and allowed(exchange):
            swap = exchange
        else:
            swaps = [{named[0]: other} for other in COLORS if other not in named and allowed({named[0]: other})]
            if not swaps:
                return None
            swap = _stable_choice(swaps, caption)
        if _EN_LOOK.search(caption):
            return _exchange(caption, {f" {a} ": f" {b} " for a, b in swap.items()})
        return _exchange(caption, {JA_COLORS[a]: JA_COLORS[b] for a, b in swap.items()})


class Contradiction:
    """The first of the chosen `kinds` of contradiction ('relation': OppositeRelation, 'count': OtherCount,
    'color': OtherColors) that applies to a caption, None if none does (a `caption_contrast:` target:
    `params: {kinds: [relation, count, color]}`; colour last, as it applies to nearly every caption)."""

    kinds = {"relation": OppositeRelation, "count": OtherCount, "color": OtherColors}

    def __init__(self, kinds: list[str] = ("relation",)):
        unknown = [kind for kind in kinds if kind not in self.kinds]
        if unknown or not kinds:
            raise ValueError(f"Contradiction kinds must be a non-empty list of {list(self.kinds)}; got {list(kinds)}")
        self.contradictions = [self.kinds[kind]() for kind in kinds]

    def __call__(self, caption: str) -> str | None:
        for contradict in self.contradictions:
            if (wrong := contradict(caption)) is not None:
                return wrong
        return None


class EnglishTranslation:
    """The English caption that says what a Japanese caption says, None for an English one (a
    `caption_consistency:` target). A scene's `captions()` list each language's phrasings in the same order, so the
    k-th Japanese caption of `scene_captions` translates the k-th English one."""

    def __call__(self, caption: str, scene_captions: list[str]) -> str | None:
        if caption.isascii():
            return None
        english = [text for text in scene_captions if text.isascii()]
        japanese = [text for text in scene_captions if not text.isascii()]
        if len(english) != len(japanese):  # a phrasing that merged with another in one language only
            return None
        return english[japanese.index(caption)]


def list_phrase(phrases: list[str], language: str) -> str:
    """'a, b and c' / 'aとbとc'."""
    if language == "ja":
        return "と".join(phrases)
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def with_background(phrase: str, background: str, language: str) -> str:
    """'a red square on a black background' / '黒い背景に赤い四角'."""
    if language == "ja":
        return f"{JA_BACKGROUNDS[background]}背景に{phrase}"
    return f"{phrase} on a {background} background"


def captions(scene: Scene, languages: tuple[str, ...] = ("en", "ja"), code_switching: bool = False) -> list[str]:
    """Every phrasing that truthfully describes the scene: with and without sizes, background and ordering.

    `code_switching`: also, per language, one phrasing with its colour words and one with its shape words in the
    other language (`code_switched`)."""
    texts = []
    for language in languages:
        phrasings = []
        for phrase in _content_phrases(scene, language):
            phrasings += [phrase, with_background(phrase, scene.background, language)]
        texts += phrasings
        if code_switching and len(languages) > 1:
            texts += [code_switched(_stable_choice(phrasings, phrasings[0] + kind), kind)
                      for kind in ("colors", "shapes")]
    return list(dict.fromkeys(texts))


_TO_JAPANESE = {"colors": JA_COLORS, "shapes": {**JA_SHAPES, **{f"{shape}s": JA_SHAPES[shape] for shape in SHAPES}}}
_TO_ENGLISH = {"colors": _JA_COLOR_NAMES, "shapes": _JA_SHAPE_NAMES}


def code_switched(caption: str, kind: str) -> str:
    """The caption with its colour words (kind "colors") or shape words ("shapes") in the other language: 'a 赤い
    circle to the left of a 青い square', '青い square の左に赤い circle'.

    Mixing the two vocabularies inside one sentence makes a word's two translations interchangeable in every
    context, the code-switching augmentation of multilingual encoders: a Japanese pair the captions never name (紫の三角)
    then borrows what the English pair (a purple triangle, as unseen) gets from composition."""
    if caption.isascii():
        words = _TO_JAPANESE[kind]
        return re.sub(rf"\b({'|'.join(sorted(words, key=len, reverse=True))})\b", lambda found: words[found.group(1)],
                      caption)
    words = _TO_ENGLISH[kind]
    switched = re.sub("|".join(words), lambda found: f" {words[found.group(0)]} ", caption)
    return " ".join(switched.split())


def _content_phrases(scene: Scene, language: str) -> list[str]:
    objects = scene.objects
    looks = {(obj.color, obj.shape) for obj in objects}
    if len(objects) > 1 and len(looks) == 1:
        return [count_phrase(objects[0], len(objects), language)]
    phrases = []
    for with_size in (False, True):
        if len(objects) == 2 and (where := relation(*objects)) is not None:
            phrases.append(relation_phrase(objects[0], where, objects[1], language, with_size))
            phrases.append(relation_phrase(objects[1], OPPOSITE[where], objects[0], language, with_size))
        for order in (objects, objects[::-1]):  # both directions of a list, not every permutation
            phrases.append(_grouped_list(list(order), language, with_size))
    return list(dict.fromkeys(phrases))


def _grouped_list(objects: list[ShapeObject], language: str, with_size: bool) -> str:
    """Objects as a list, identical-looking ones counted ('two red circles and a blue square')."""
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in objects:
        groups.setdefault((obj.color, obj.shape), []).append(obj)
    phrases = []
    for members in groups.values():
        if len(members) == 1:
            phrases.append(object_phrase(members[0], language, with_size))
        else:
            phrases.append(count_phrase(members[0], len(members), language))
    return list_phrase(phrases, language)


# ------------------------------------------------------------------------------------------------- dataset

class ShapesDataset(torch.utils.data.Dataset):
    """Scene i is a pure function of (seed, i): rendered on the fly, identical across runs and processes.

    Items are {"image": (3, size, size) in [-1, 1], "captions": [...]}, the format `ldm.training` reads.
    """

    def __init__(self, length: int = 100_000, size: int = CANVAS, seed: int = 0,
                 languages: tuple[str, ...] = ("en", "ja"), held_out: frozenset = HELD_OUT,
                 scene_kinds: dict[str, float] = SCENE_KINDS, code_switching: bool = False):
        self.length, self.size, self.seed, self.code_switching = length, size, seed, code_switching
        self.languages, self.held_out = tuple(languages), frozenset(map(tuple, held_out))
        self.scene_kinds = check_scene_kinds(scene_kinds)
        if code_switching and len(self.languages) < 2:
            raise ValueError(f"code_switching mixes two languages, but languages={self.languages}: pass both "
                             "('en', 'ja') or code_switching=False")

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        return sample_scene(np.random.default_rng([self.seed, index]), self.held_out, self.scene_kinds)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": to_tensor(render(scene, self.size)),
                "captions": captions(scene, self.languages, self.code_switching)}

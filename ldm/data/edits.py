"""Paired edits in the shapes world: a source scene, the scene an instruction asks for, and that instruction in
English and Japanese, to train and evaluate an instruction-editing model (InstructPix2Pix-style).

    edit = sample_edit(np.random.default_rng([seed, index]))   # source, target, changes
    edit.instructions()     # ["make the circle blue", ..., "can you turn the circle blue?", "丸を青くして", ...]
    EditDataset(seed=0)[i]  # {"source", "target": images, "instructions": [...], "kinds": ("recolor",)}

An edit makes one or two changes (KINDS): recolour an object, change the background, move an object (to a side
of the canvas or next to another object), add one, remove one, resize one. A `Change` records what its words say
and nothing more (the kind, the object as named, the new value, the placement; no pixels), so the words can be
read back into it, and every instruction of an edit says the same thing in other words. The words name the
changed object unambiguously: they fit it and no other object, before the edit and after it. Every other object
keeps its exact geometry, moved and added objects keep the world's gap to all others, and the held-out
colour-shape pairs (`shapes.HELD_OUT`) appear in no image and no text.

Placements are drawn so that a detector can check them: the target lies where it was asked by RELATION_MARGIN
pixels and the source misses by as much, so neither a slightly-off detection of the answer fails nor an unedited
image passes (`ldm.edit_evaluation`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from ldm.data.shapes import (
    BACKGROUNDS, CANVAS, COLORS, EN_RELATIONS, HELD_OUT, JA_BACKGROUNDS, JA_COLORS, JA_RELATIONS, JA_SHAPES,
    JA_SIZES, OPPOSITE, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, allowed_pairs, lies, object_phrase, relation,
    render, sample_scene, to_tensor, touching,
)

KINDS = ("recolor", "background", "move", "add", "remove", "resize")
TWO_EDITS = "two_edits"  # the category of an edit that makes two changes in one instruction
CATEGORIES = (*KINDS, TWO_EDITS)
# Moves and additions come in more variants (sides, references), two-edit instructions in the most.
CATEGORY_SHARES = {"recolor": 0.13, "background": 0.10, "move": 0.17, "add": 0.15, "remove": 0.10, "resize": 0.10,
                   TWO_EDITS: 0.25}
LANGUAGES = ("en", "ja")
MAX_OBJECTS = 3  # the world's scenes hold 1-3 objects, before and after an edit

# Pixels (64-pixel canvas) a detected centre may lie from the truth and still count as the same place: the
# ShapeEval detector's centres stay within 0.65 px of the truth up to blur radius 1.5 (300 rendered scenes), and
# an object shifted by 3 px must still count as moved (3 - 0.65 > 2).
POSITION_TOLERANCE = 2.0
RELATION_MARGIN = 2 * POSITION_TOLERANCE  # a relation compares two centres, each of them up to the tolerance off
SIDE_THIRD = CANVAS / 3  # an object is on a side of the canvas when its centre lies in that third of it
MIN_MOVE = 8.0           # a move carries an object's centre at least this far: plainly visible


@dataclass(frozen=True)
class Mention:
    """An object as an instruction names it: always by its shape, by colour and size only where the words say."""

    shape: str
    color: str | None = None
    size: str | None = None

    @classmethod
    def of(cls, obj: ShapeObject, attributes: Collection[str]) -> Mention:
        return cls(obj.shape, obj.color if "color" in attributes else None, obj.size if "size" in attributes else None)

    def matches(self, obj) -> bool:
        """Whether the words fit obj (a scene or a detected object)."""
        return obj.shape == self.shape and self.color in (None, obj.color) and self.size in (None, obj.size)

    def definite(self, language: str) -> str:
        """'the large red circle' / '大きい赤い丸', with only the words the mention has."""
        if language == "ja":
            return JA_SIZES.get(self.size, "") + JA_COLORS.get(self.color, "") + JA_SHAPES[self.shape]
        return " ".join(["the", *(word for word in (self.size, self.color) if word), self.shape])


@dataclass(frozen=True)
class Change:
    """One change as its instruction states it.

    recolor, resize: `subject` takes colour or size `value`. background: the background becomes `value`.
    move: `subject` goes `where` (a RELATIONS key) of `reference`, or to that side of the canvas without one.
    add: a new object as `subject` describes it (colour always, size where said), placed like a move, or
        anywhere when `where` is None. remove: `subject` goes.
    """

    kind: str
    subject: Mention | None = None
    value: str | None = None
    where: str | None = None
    reference: Mention | None = None


@dataclass(frozen=True)
class Edit:
    """A source scene, the target scene its changes make, and per change the object it leaves in the target
    (`outcomes`: None for a removal or the background)."""

    source: Scene
    target: Scene
    changes: tuple[Change, ...]
    outcomes: tuple[ShapeObject | None, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(change.kind for change in self.changes)

    @property
    def category(self) -> str:
        return self.kinds[0] if len(self.changes) == 1 else TWO_EDITS

    def named(self, mention: Mention | None) -> ShapeObject | None:
        """The source object a subject or reference mention names; None without a mention, and for an added
        object's (it names nothing in the source)."""
        found = [obj for obj in self.source.objects if mention is not None and mention.matches(obj)]
        return found[0] if len(found) == 1 else None

    @property
    def bystanders(self) -> tuple[ShapeObject, ...]:
        """Source objects no change touches: the target holds each of them exactly as it was."""
        touched = {self.named(change.subject) for change in self.changes}
        return tuple(obj for obj in self.source.objects if obj not in touched)

    def instructions(self, languages: Sequence[str] = LANGUAGES, templates: str = "extended") -> list[str]:
        """Every phrasing in each language, in that order (a dataset item's instruction list)."""
        return [text for language in check_languages(languages)
                for text in instructions(self.changes, language, templates)]


def check_languages(languages: Sequence[str]) -> tuple[str, ...]:
    if not languages or not set(languages) <= set(LANGUAGES):
        raise ValueError(f"languages must be a non-empty subset of {LANGUAGES}, got {tuple(languages)}")
    return tuple(languages)


def _check_one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")


# ------------------------------------------------------------------------------------------------- placement

def side_depth(obj, where: str) -> float:
    """How far obj's centre lies inside the third of the canvas on side `where` (negative: outside it)."""
    near, far = SIDE_THIRD, CANVAS - SIDE_THIRD
    return {"left of": near - obj.x, "right of": obj.x - far, "above": near - obj.y, "below": obj.y - far}[where]


def placed(obj, where: str, anchor=None, margin: float = 0.0) -> bool:
    """Whether obj lies `where` of anchor (`shapes.lies`), or on that side of the canvas without an anchor, by
    `margin` pixels (negative: within that tolerance). Takes scene or detected objects."""
    if anchor is None:
        return side_depth(obj, where) >= margin
    return lies(obj, where, anchor, margin)


# ------------------------------------------------------------------------------------------------- sampling

def sample_edit(rng: np.random.Generator, category: str | None = None, held_out: frozenset = HELD_OUT,
                shares: dict[str, float] = CATEGORY_SHARES) -> Edit:
    """A random edit of a random scene, of `category` when given, else of one drawn by `shares`: a pure function
    of the generator's state, like `shapes.sample_scene` (whose scenes are the sources). A category is a kind, a
    pair of kinds in order ("add+move": add an object, then move one) or TWO_EDITS (any pair, uniformly)."""
    if category is None:
        names = list(shares)
        category = names[rng.choice(len(names), p=list(shares.values()))]
    kinds = _kinds(rng, category)
    while True:  # some scenes allow no such edit (nothing to remove, no room to move): draw another
        edit = _try_edit(rng, sample_scene(rng, held_out), kinds, held_out)
        if edit is not None:
            return edit


PAIRS = tuple(f"{a}+{b}" for a in KINDS for b in KINDS if (a, b) != ("background", "background"))


def check_category_shares(shares: dict[str, float]) -> dict[str, float]:
    """`shares` as probabilities (they need not sum to 1), its categories checked."""
    for name in shares:
        _check_category(name)
    total = sum(shares.values())
    if any(share < 0 for share in shares.values()) or total <= 0:
        raise ValueError(f"category shares must be non-negative with a positive sum, got {dict(shares)}")
    return {name: share / total for name, share in shares.items()}


def _check_category(name: str) -> None:
    if name not in CATEGORIES and name not in PAIRS:
        raise ValueError(f"unknown edit category {name!r}: use a kind {KINDS}, {TWO_EDITS!r} (any pair) or a pair "
                         "of kinds such as 'add+move' (background+background is not one)")


def _kinds(rng: np.random.Generator, category: str) -> tuple[str, ...]:
    _check_category(category)
    if category == TWO_EDITS:
        category = PAIRS[rng.integers(len(PAIRS))]
    return tuple(category.split("+"))


@dataclass(frozen=True)
class _Step:
    """A change decided on a draft: slot of the object changed or added (None: the background), new value,
    placement `where` relative to the object in slot `reference` (None: a side of the canvas)."""

    kind: str
    slot: int | None = None
    value: str | None = None
    where: str | None = None
    reference: int | None = None


class _Draft:
    """The scene while changes are applied: slot i holds source object i (None once removed), added objects
    follow. A changed slot is never changed again and a reference never changes."""

    def __init__(self, source: Scene):
        self.source, self.background = source, source.background
        self.slots: list[ShapeObject | None] = list(source.objects)
        self.changed: set[int] = set()
        self.pinned: set[int] = set()

    def objects(self) -> list[ShapeObject]:
        return [obj for obj in self.slots if obj is not None]

    def unchanged(self, rng: np.random.Generator, allow_pinned: bool = False, exclude: int | None = None) -> int | None:
        """A random slot holding an unchanged source object (None when there is none)."""
        slots = [i for i, obj in enumerate(self.slots[:len(self.source.objects)]) if obj is not None
                 and i not in self.changed and i != exclude and (allow_pinned or i not in self.pinned)]
        return slots[rng.integers(len(slots))] if slots else None

    def fits(self, obj: ShapeObject, slot: int | None = None) -> bool:
        """Inside the canvas as `shapes.place` keeps objects, and touching no object but the one in `slot`."""
        low, high = obj.half_extent + 1, CANVAS - obj.half_extent - 1
        inside = low <= obj.x <= high and low <= obj.y <= high
        return inside and not any(touching(obj, other) for i, other in enumerate(self.slots)
                                  if other is not None and i != slot)

    def put(self, slot: int, obj: ShapeObject | None) -> int:
        """Change slot to obj (slot len(slots): add obj) and return the slot."""
        if slot == len(self.slots):
            self.slots.append(obj)
        else:
            self.slots[slot] = obj
        self.changed.add(slot)
        return slot


def _try_edit(rng: np.random.Generator, source: Scene, kinds: tuple[str, ...], held_out: frozenset) -> Edit | None:
    draft = _Draft(source)
    steps = []
    for kind in kinds:
        step = _MAKERS[kind](rng, draft, held_out)
        if step is None:
            return None
        steps.append(step)
    return _finish(rng, draft, steps)


def _recolor(rng: np.random.Generator, draft: _Draft, held_out: frozenset) -> _Step | None:
    slot = draft.unchanged(rng)
    if slot is None:
        return None
    obj = draft.slots[slot]
    colors = [color for color in COLORS if color != obj.color and (color, obj.shape) not in held_out]
    color = colors[rng.integers(len(colors))]
    draft.put(slot, replace(obj, color=color))
    return _Step("recolor", slot, color)


def _background(rng: np.random.Generator, draft: _Draft, held_out: frozenset) -> _Step:
    backgrounds = [name for name in BACKGROUNDS if name != draft.background]
    draft.background = backgrounds[rng.integers(len(backgrounds))]
    return _Step("background", value=draft.background)


def _resize(rng: np.random.Generator, draft: _Draft, held_out: frozenset) -> _Step | None:
    """In place: the centre stays, so the grown object must still fit."""
    slot = draft.unchanged(rng)
    if slot is None:
        return None
    obj = draft.slots[slot]
    resized = replace(obj, size=SIZES[1 - SIZES.index(obj.size)])
    if not draft.fits(resized, slot):
        return None
    draft.put(slot, resized)
    return _Step("resize", slot, resized.size)


def _remove(rng: np.random.Generator, draft: _Draft, held_out: frozenset) -> _Step | None:
    slot = draft.unchanged(rng)
    if slot is None or len(draft.objects()) < 2:  # an edit never empties the scene
        return None
    draft.put(slot, None)
    return _Step("remove", slot)


def _move(rng: np.random.Generator, draft: _Draft, held_out: frozenset) -> _Step | None:
    """To a side (the other coordinate kept: "move it to the left" moves it sideways) or next to another object."""
    slot = draft.unchanged(rng)
    if slot is None:
        return None
    obj = draft.slots[slot]
    where, reference = _placement(rng, draft, exclude=slot)
    anchor = None if reference is None else draft.slots[reference]
    if placed(obj, where, anchor, -RELATION_MARGIN):
        return None  # already there, or near enough that a detector could take the source for the answer
    keep = None if anchor is not None else "y" if where in ("left of", "right of") else "x"
    moved = _spot(rng, obj, draft, slot, lambda new: _there(new, where, anchor)
                  and np.hypot(new.x - obj.x, new.y - obj.y) >= MIN_MOVE, keep)
    if moved is None:
        return None
    draft.put(slot, moved)
    return _Step("move", slot, where=where, reference=reference)


def _add(rng: np.random.Generator, draft: _Draft, held_out: frozenset) -> _Step | None:
    """A colour-shape pair not yet in the scene (so "add a red circle" asks for something new), anywhere or placed."""
    present = {(obj.color, obj.shape) for obj in [*draft.source.objects, *draft.objects()]}
    looks = [look for look in allowed_pairs(held_out) if look not in present]
    if len(draft.objects()) >= MAX_OBJECTS or not looks:
        return None
    color, shape = looks[rng.integers(len(looks))]
    new = ShapeObject(shape, color, SIZES[rng.integers(len(SIZES))])
    where, reference = _placement(rng, draft) if rng.random() < 0.6 else (None, None)
    anchor = None if reference is None else draft.slots[reference]
    spot = _spot(rng, new, draft, None, lambda obj: where is None or _there(obj, where, anchor))
    if spot is None:
        return None
    return _Step("add", draft.put(len(draft.slots), spot), where=where, reference=reference)


_MAKERS: dict[str, Callable[[np.random.Generator, _Draft, frozenset], _Step | None]] = {
    "recolor": _recolor, "background": _background, "move": _move, "add": _add, "remove": _remove,
    "resize": _resize,
}


def _placement(rng: np.random.Generator, draft: _Draft, exclude: int | None = None) -> tuple[str, int | None]:
    """A direction, relative to an unchanged object (half the time, when there is one) or else a canvas side."""
    where = RELATIONS[rng.integers(len(RELATIONS))]
    reference = draft.unchanged(rng, allow_pinned=True, exclude=exclude) if rng.random() < 0.5 else None
    if reference is not None:
        draft.pinned.add(reference)
    return where, reference


def _there(obj: ShapeObject, where: str, anchor: ShapeObject | None) -> bool:
    """Clearly where asked: by RELATION_MARGIN, and next to an anchor also by the captions' own rule."""
    return placed(obj, where, anchor, RELATION_MARGIN) and (anchor is None or relation(obj, anchor) == where)


def _spot(rng: np.random.Generator, obj: ShapeObject, draft: _Draft, slot: int | None,
          accept: Callable[[ShapeObject], bool], keep: str | None = None, tries: int = 100) -> ShapeObject | None:
    """obj at a random accepted position that fits the draft (drawn like `shapes.place`); `keep` ("x" or "y")
    holds that coordinate. None when no try succeeds."""
    low, high = obj.half_extent + 1, CANVAS - obj.half_extent - 1
    for _ in range(tries):
        x, y = (round(float(value), 1) for value in rng.uniform(low, high, size=2))
        candidate = replace(obj, x=obj.x if keep == "x" else x, y=obj.y if keep == "y" else y)
        if accept(candidate) and draft.fits(candidate, slot):
            return candidate
    return None


# Mentions name the shape and what else disambiguates; fewer words are preferred, more are a natural variant.
MENTION_ATTRIBUTES = ((), ("color",), ("size",), ("size", "color"))
ADDED_ATTRIBUTES = (("color",), ("size", "color"))  # "add a triangle" would leave its colour to chance
FEWEST_WORDS_SHARE = 0.75


def _finish(rng: np.random.Generator, draft: _Draft, steps: list[_Step]) -> Edit | None:
    """The edit, once words can name every object it mentions unambiguously (else None)."""
    source, target = draft.source, Scene(draft.background, tuple(draft.objects()))
    if not 1 <= len(target.objects) <= MAX_OBJECTS:
        return None
    changes, outcomes = [], []
    for step in steps:
        outcome = None if step.slot is None else draft.slots[step.slot]
        subject = reference = None
        if step.kind == "add":  # fits nothing in the source and only the new object in the target
            subject = _mention(rng, outcome, ADDED_ATTRIBUTES, source, target, (), (outcome,))
        elif step.slot is not None:  # fits only the subject before, and at most its outcome after
            obj = source.objects[step.slot]
            subject = _mention(rng, obj, MENTION_ATTRIBUTES, source, target, (obj,), (outcome,), exact=False)
        if step.reference is not None:
            anchor = source.objects[step.reference]
            reference = _mention(rng, anchor, MENTION_ATTRIBUTES, source, target, (anchor,), (anchor,))
        if (subject is None) != (step.slot is None) or (reference is None) != (step.reference is None):
            return None  # an object no words single out
        changes.append(Change(step.kind, subject, step.value, step.where, reference))
        outcomes.append(None if step.kind == "remove" else outcome)
    return Edit(source, target, tuple(changes), tuple(outcomes))


def _mention(rng: np.random.Generator, obj: ShapeObject, options: Sequence[tuple[str, ...]], source: Scene,
             target: Scene, before: tuple, after: tuple, exact: bool = True) -> Mention | None:
    """A mention of obj whose matches are `before` among the source objects and `after` among the target's
    (with exact=False: a subset of `after`, which may hold None); None when no option does."""
    def fits(mention: Mention) -> bool:
        found_after = tuple(o for o in target.objects if mention.matches(o))
        return (tuple(o for o in source.objects if mention.matches(o)) == before
                and (found_after == after if exact else set(found_after) <= set(after)))

    valid = [mention for mention in dict.fromkeys(Mention.of(obj, option) for option in options) if fits(mention)]
    if not valid:
        return None
    fewest = [m for m in valid if _words(m) == min(map(_words, valid))]
    choices = fewest if rng.random() < FEWEST_WORDS_SHARE else valid
    return choices[rng.integers(len(choices))]


def _words(mention: Mention) -> int:
    return (mention.color is not None) + (mention.size is not None)


# ------------------------------------------------------------------------------------------------- instructions

EN_SIDES = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
EN_RESIZE = {"large": ("bigger", "enlarge"), "small": ("smaller", "shrink")}  # comparative, verb
EN_RESIZE_MORE = {"large": ("larger", "big", "scale up", "increase"),  # adjective, plain word, verb, "... the size of"
                  "small": ("tiny", "little", "scale down", "reduce")}
JA_RESIZE = {"large": "拡大", "small": "縮小"}
# Verbs beyond the first three of each kind: users word requests many ways, and a word no instruction used in
# training reaches the model only as sub-word pieces it never learnt to read.
EN_REMOVE = ("remove", "delete", "get rid of", "erase", "take out", "take away", "eliminate")
EN_MOVE = ("drag", "slide", "bring", "relocate")
EN_ADD = ("insert", "include", "create", "place")
JA_REMOVE = ("消して", "削除して", "取り除いて", "消去して", "なくして", "取って", "消し去って")
JA_ADD = ("加えて", "入れて", "描き足して", "新しく描いて")
EN_REQUESTS = ("{}", "please {}", "can you {}?", "could you {}?", "{}, please")
JA_REQUESTS = ("{}", "{}ください", "{}くれる？", "{}もらえる？", "{}ほしい")  # after a te-form: して -> してください
# The templates the first edit models trained on ("original"), before the verbs and request forms above were added
# ("extended"): the first four recolour and background templates, the first three of the other kinds and of the
# request forms. The edit evaluation's benchmark cases keep them, so its numbers compare across models.
TEMPLATE_SETS = ("original", "extended")
_ORIGINAL_TEMPLATES = {"recolor": 4, "background": 4, "resize": 3, "remove": 3, "move": 3, "add": 3}
_ORIGINAL_REQUESTS = 3


def instructions(changes: Sequence[Change], language: str, templates: str = "extended") -> list[str]:
    """Every phrasing of the changes in one language: each clause template in turn (two changes take the same
    template index), in each request form. Both languages have as many templates per kind, so as many phrasings.
    `templates`: "extended", or the "original" subset (TEMPLATE_SETS)."""
    _check_one_of("language", language, LANGUAGES)
    _check_one_of("templates", templates, TEMPLATE_SETS)
    original = templates == "original"
    clauses = [(_english_clauses if language == "en" else _japanese_clauses)(change) for change in changes]
    if original:
        clauses = [options[:_ORIGINAL_TEMPLATES[change.kind]] for options, change in zip(clauses, changes)]
    bodies = [_join([options[i % len(options)] for options in clauses], language)
              for i in range(max(map(len, clauses)))]
    requests = (EN_REQUESTS if language == "en" else JA_REQUESTS)[:_ORIGINAL_REQUESTS if original else None]
    return list(dict.fromkeys(request.format(body) for request in requests for body in bodies))


def _join(clauses: list, language: str) -> str:
    """'丸を青くして、背景を黒くして'; in English a verb shared by both clauses is said once
    ('make the circle blue and the background black')."""
    if language == "ja":
        return "、".join(clauses)
    (verb, rest), *others = clauses
    return " and ".join([f"{verb} {rest}", *(r if v == verb else f"{v} {r}" for v, r in others)])


def _english_clauses(change: Change) -> list[tuple[str, str]]:
    """(verb, rest) phrasings of one change."""
    kind, value = change.kind, change.value
    named = _named(change, "en")
    if kind in ("recolor", "background"):
        return [("make", f"{named} {value}"), ("turn", f"{named} {value}"), ("change", f"{named} to {value}"),
                ("paint", f"{named} {value}"), ("color", f"{named} {value}"), ("recolor", f"{named} {value}"),
                ("set", f"{named} to {value}"), ("change", f"the color of {named} to {value}")]
    if kind == "resize":
        comparative, verb = EN_RESIZE[value]
        adjective, plain, verb_up, verb_size = EN_RESIZE_MORE[value]
        return [("make", f"{named} {value}"), ("make", f"{named} {comparative}"), (verb, named),
                ("make", f"{named} {adjective}"), ("make", f"{named} {plain}"), (verb_up, named),
                (verb_size, f"the size of {named}")]
    if kind == "remove":
        return [(verb, named) for verb in EN_REMOVE]
    if kind == "move" and change.reference is None:
        side = EN_SIDES[change.where]
        return [("move", f"{named} to the {side}"), ("shift", f"{named} to the {side}"),
                ("put", f"{named} {_english_place(change)}"), *((verb, f"{named} to the {side}") for verb in EN_MOVE)]
    if kind == "move":
        return [(verb, f"{named} {_english_place(change)}") for verb in ("move", "put", "place", *EN_MOVE)]
    if change.where is None:
        return [(verb, named) for verb in ("add", "draw", "put in", *EN_ADD)]
    return [(verb, f"{named} {_english_place(change)}") for verb in ("add", "draw", "put", *EN_ADD)]


def _japanese_clauses(change: Change) -> list[str]:
    """Te-form phrasings of one change ('丸を青くして'): they join with '、' and take a request ending."""
    kind, value = change.kind, change.value
    named = _named(change, "ja")
    if kind in ("recolor", "background"):
        adjective = JA_BACKGROUNDS[value] if kind == "background" else JA_COLORS[value]
        noun = _ja_noun(adjective)
        # i-adjective colours say both 青くして and 青にして; the others only 緑にして, so they get another form
        fourth = f"{named}を{noun}にして" if adjective.endswith("い") else f"{named}の色を{noun}に変えて"
        # 青 -> 青色; 黄色 and 灰色 say it already, and 灰色にして / 黄色にして are taken, so those are dyed instead
        colour = noun if noun.endswith("色") else f"{noun}色"
        fifth = f"{named}を{noun}に染めて" if colour == noun else f"{named}を{colour}にして"
        return [f"{named}を{_ja_adverb(adjective)}して", f"{named}を{noun}に変えて", f"{named}の色を{noun}にして",
                fourth, fifth, f"{named}を{noun}に塗って", f"{named}の色を{noun}に変更して",
                f"{named}を{colour}に塗り替えて"]
    if kind == "resize":
        adjective = JA_SIZES[value]
        adverb = _ja_adverb(adjective)
        return [f"{named}を{adverb}して", f"{named}のサイズを{adverb}して", f"{named}を{JA_RESIZE[value]}して",
                f"{named}の大きさを{adverb}して", f"{named}をもっと{adverb}して", f"{named}を{adjective}サイズにして",
                f"{named}を{adjective[:-1]}めにして"]
    if kind == "remove":
        return [f"{named}を{verb}" for verb in JA_REMOVE]
    if kind == "add" and change.where is None:
        return [f"{named}を{verb}" for verb in ("追加して", "描いて", "足して", *JA_ADD)]
    place = _japanese_place(change)
    if kind == "move" and change.reference is None:
        return [f"{named}を{place}に動かして", f"{named}を{place}側に移動して", f"{named}を{place}に寄せて",
                f"{named}を{place}へ動かして", f"{named}を{place}に移して", f"{named}を{place}へ移動させて",
                f"{named}を{place}に持っていって"]
    if kind == "move":
        return [f"{named}を{place}に{verb}" for verb in ("動かして", "移動して", "置いて", "移して", "持っていって")] + \
            [f"{named}を{place}へ{verb}" for verb in ("動かして", "移動させて")]
    return [f"{place}に{named}を{verb}" for verb in ("追加して", "描いて", "置いて", *JA_ADD)]


def unseen_instructions(change: Change, language: str) -> list[str]:
    """Phrasings of one change that no training template produces: other verbs ("wipe out", "carry", "sketch"),
    other constructions ("the circle should be blue") and other particles and endings ("白へ変えて", "消しちゃって").
    The edit evaluation asks with them (`wording="unseen"`) to measure how a model copes with words it never read;
    keep them out of the training templates, or that measure is lost."""
    _check_one_of("language", language, LANGUAGES)
    return (_unseen_english if language == "en" else _unseen_japanese)(change)


def _unseen_english(change: Change) -> list[str]:
    kind, value, named = change.kind, change.value, _named(change, "en")
    if kind in ("recolor", "background"):
        return [f"{named} should be {value}", f"i want {named} in {value}", f"give {named} a {value} color",
                f"fill {named} with {value}"]
    if kind == "resize":
        if value == "large":
            return [f"{named} should be bigger", f"make {named} huge", f"grow {named}", f"make {named} a bit bigger"]
        return [f"{named} should be smaller", f"minimize {named}", f"shrink down {named}",
                f"make {named} a bit smaller"]
    if kind == "remove":
        return [f"clear {named}", f"drop {named}", f"wipe out {named}", f"make {named} disappear"]
    if kind == "move":
        place = f"to the {EN_SIDES[change.where]}" if change.reference is None else _english_place(change)
        return [f"move {named} over {place}", f"push {named} {place}", f"carry {named} {place}",
                f"{named} should go {place}"]
    place = "" if change.where is None else f" {_english_place(change)}"
    return [f"also add {named}{place}", f"paint {named}{place}", f"sketch {named}{place}",
            f"there should be {named}{place}"]


def _unseen_japanese(change: Change) -> list[str]:
    kind, value, named = change.kind, change.value, _named(change, "ja")
    if kind in ("recolor", "background"):
        noun = _ja_noun(JA_BACKGROUNDS[value] if kind == "background" else JA_COLORS[value])
        return [f"{named}の色を{noun}へ変えて", f"{named}を{noun}へ変えて", f"{named}を{noun}で塗って",
                f"{named}の色は{noun}にして"]
    if kind == "resize":
        adjective = JA_SIZES[value]
        adverb, stem = _ja_adverb(adjective), adjective[:-1]
        return [f"{named}をより{adverb}して", f"{named}のサイズを{stem}めにして", f"{named}を少し{adverb}して",
                f"{named}の大きさを{stem}めにして"]
    if kind == "remove":
        return [f"{named}を{verb}" for verb in ("除いて", "消しちゃって", "削って", "なくしてしまって")]
    if kind == "move":
        place = _japanese_place(change)
        return [f"{named}を{place}にずらして", f"{named}を{place}の方に動かして", f"{named}を{place}の方へ移動して",
                f"{named}を{place}に移動させて"]
    place = "" if change.where is None else f"{_japanese_place(change)}に"
    return [f"{place}{named}を{verb}" for verb in ("描き加えて", "ひとつ追加して", "足してみて", "一つ描いて")]


def _named(change: Change, language: str) -> str:
    """What a clause changes: the background, the new object ('a yellow triangle'), or the subject ('the circle')."""
    if change.kind == "background":
        return "the background" if language == "en" else "背景"
    if change.kind == "add":  # the caption grammar's own phrase: 'a yellow triangle' / '黄色い三角'
        obj = ShapeObject(change.subject.shape, change.subject.color, change.subject.size or SIZES[0])
        return object_phrase(obj, language, with_size=change.subject.size is not None)
    return change.subject.definite(language)


def _english_place(change: Change) -> str:
    """'to the left of the blue square', or a side of the canvas: 'on the left', 'at the top'."""
    if change.reference is not None:
        return f"{EN_RELATIONS[change.where]} {change.reference.definite('en')}"
    preposition = "on" if change.where in ("left of", "right of") else "at"
    return f"{preposition} the {EN_SIDES[change.where]}"


def _japanese_place(change: Change) -> str:
    """'青い四角の左', or a side of the canvas: '左'."""
    side = JA_RELATIONS[change.where]
    return side if change.reference is None else f"{change.reference.definite('ja')}の{side}"


def _ja_noun(adjective: str) -> str:
    """赤い -> 赤, 緑の -> 緑: the colour word without its adjective ending or particle."""
    return adjective[:-1]


def _ja_adverb(adjective: str) -> str:
    """赤い -> 赤く, 緑の -> 緑に, 大きい -> 大きく: the form that goes before して ('make it ...')."""
    return adjective[:-1] + ("く" if adjective.endswith("い") else "に")


def _opposites(words: dict[str, str]) -> dict[str, str]:
    return {words[where]: words[OPPOSITE[where]] for where in RELATIONS}


_EN_OPPOSITES = {**_opposites(EN_SIDES), **_opposites({where: EN_RELATIONS[where].removesuffix(" of").split()[-1]
                                                      for where in RELATIONS})}  # left/right, top/bottom, above/below
_JA_OPPOSITES = _opposites(JA_RELATIONS)
_EN_DIRECTION = re.compile(rf"\b({'|'.join(_EN_OPPOSITES)})\b")
_JA_DIRECTION = re.compile(f"({'|'.join(_JA_OPPOSITES)})")  # no other instruction word holds 左, 右, 上 or 下


class OppositeDirection:
    """An instruction with every direction turned around ('move the circle to the right' for '... to the left',
    '青い四角の下に' for '青い四角の上に'), None for one without a direction: the target of a move or a placed addition
    contradicts it only by where the object went (for the `caption_contrast:` loss of an instruct_edit config)."""

    def __call__(self, instruction: str) -> str | None:
        for pattern, opposites in ((_EN_DIRECTION, _EN_OPPOSITES), (_JA_DIRECTION, _JA_OPPOSITES)):
            turned, count = pattern.subn(lambda found: opposites[found.group(1)], instruction)
            if count:
                return turned
        return None


# ------------------------------------------------------------------------------------------------- dataset

class EditDataset(torch.utils.data.Dataset):
    """Edit i is a pure function of (seed, i), rendered on the fly like `ShapesDataset`'s scenes.

    Items are {"source", "target": (3, size, size) in [-1, 1], "instructions": every phrasing in `languages`
    from the `templates` set, "kinds": the kinds of its changes}, the format the instruct_edit training stage reads.
    """

    def __init__(self, length: int = 100_000, size: int = CANVAS, seed: int = 0,
                 languages: Sequence[str] = LANGUAGES, held_out: frozenset = HELD_OUT, templates: str = "extended",
                 category_shares: dict[str, float] = CATEGORY_SHARES):
        _check_one_of("templates", templates, TEMPLATE_SETS)
        self.category_shares = check_category_shares(dict(category_shares))
        self.length, self.size, self.seed, self.templates = length, size, seed, templates
        self.languages, self.held_out = check_languages(languages), frozenset(map(tuple, held_out))
        unknown = {pair for pair in self.held_out if pair[0] not in COLORS or pair[1] not in SHAPES}
        if unknown:
            raise ValueError(f"held_out pairs must be (colour, shape) of the world, got {sorted(unknown)}")

    def __len__(self) -> int:
        return self.length

    def edit(self, index: int) -> Edit:
        return sample_edit(np.random.default_rng([self.seed, index]), held_out=self.held_out,
                           shares=self.category_shares)

    def __getitem__(self, index: int) -> dict:
        edit = self.edit(index)
        return {"source": to_tensor(render(edit.source, self.size)),
                "target": to_tensor(render(edit.target, self.size)),
                "instructions": edit.instructions(self.languages, self.templates), "kinds": edit.kinds}

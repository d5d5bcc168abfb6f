"""ShapeEval: GenEval-style scoring of a text-to-image model on the shapes world (`ldm.data.shapes`).

    prompts = shape_eval_prompts()                       # seven categories, English and Japanese, seen / held out
    generate = lambda texts, seeds: pipe(texts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                                         height=64, width=64).images   # any callable: texts, seeds -> PIL images
    report = evaluate(generate, prompts)
    print(report.table())

Each generated image goes through a detector written for this world (palette colours on a flat background, so
no learned detector is needed), and a per-category rule (`score`) decides whether the image shows what its
prompt asked for. Held-out prompts name a colour-shape pair that never appears in training (`HELD_OUT`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ldm.data.shapes import (
    BACKGROUNDS, CANVAS, COLORS, HALF_EXTENT, HELD_OUT, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, place,
    count_phrase, lies, list_phrase, object_phrase, relation, relation_phrase, with_background,
)

# ------------------------------------------------------------------------------------------------- detection

# A pixel this far (in RGB units) from every blend of the background with a palette colour is no palette colour.
MAX_COLOR_DISTANCE = 80.0
# An object's soft edge (blur, antialiasing) is looked for this many pixels around its core.
EDGE_REACH = 2
# Objects with less mass than a quarter of the smallest object (a small triangle) are specks.
MIN_AREA = 0.25 * (2 * HALF_EXTENT["small"]) ** 2 / 2
# Objects wider or taller than halfway between the small and the large extent are large.
LARGE_EXTENT = HALF_EXTENT["small"] + HALF_EXTENT["large"]
# An upright triangle's mass piles up at its base: its rows' mass has skewness -2 sqrt(2) / 5 = -0.57, which
# blur shrinks to about -0.4; circles and squares are symmetric (0).
TRIANGLE_SKEW = -0.25
# A square fills its box, a circle pi/4 of it; rounded corners and blur move both a little.
SQUARE_FILL = (1 + math.pi / 4) / 2

_OBJECT_RGB = np.array(list(COLORS.values()), dtype=np.float32)          # (6, 3)
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (3, 3)


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    color: str
    size: str
    x: float  # centre of the bounding box in pixels of the 64-pixel canvas: the point ShapeObject.x, .y name
    y: float
    box: tuple[float, float, float, float]  # left, top, right, bottom, 64-pixel canvas
    area: float  # mass of the object's colour (antialiased edge pixels count in part), 64-pixel canvas


@dataclass(frozen=True)
class Detection:
    background: str
    objects: tuple[DetectedObject, ...]  # top to bottom, then left to right


def detect(image: Image.Image) -> Detection:
    """Find the background and every object of a shapes-world image of any square size.

    The image is resized to the 64-pixel canvas (the world's geometry). The background is the background colour
    most border pixels are nearest to. Antialiased or blurred edges are blends of the background and an object
    colour, so each pixel is assigned to the object colour whose blend with the background it lies nearest to,
    with the amount of that colour as its weight. Connected pixels of one colour that are more object than
    background form an object's core. Its weights, core and soft edge together, relative to the amount inside
    the core (a model may draw a colour a little off the palette), are measured by _describe. Objects lighter
    than MIN_AREA are specks and dropped.
    """
    pixels = _canvas_pixels(image)
    background, background_rgb = _background(pixels)
    color, amount = _blend(pixels, background_rgb)
    labels = _connected_components(np.where(amount > 0.5, color, -1))
    objects = []
    for label in np.unique(labels[labels > 0]):
        core = labels == label
        index = color[core][0]
        own_edge = _grow(core, EDGE_REACH) & ((labels == label) | (labels == 0)) & (color == index)
        interior = core & ~_grow(~core, 1)
        full = np.median(amount[interior if interior.any() else core])  # the object's own strength of colour
        weights = np.where(own_edge, np.minimum(amount / full, 1.0), 0.0)
        if weights.sum() >= MIN_AREA:
            objects.append(_describe(weights, list(COLORS)[index]))
    return Detection(background, tuple(sorted(objects, key=lambda obj: (obj.y, obj.x))))


def _canvas_pixels(image: Image.Image) -> np.ndarray:
    """(64, 64, 3) float RGB. BOX resampling averages like the renderer's own supersampling does."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"detect() takes a PIL image, got {type(image).__name__}; convert arrays with Image.fromarray")
    if image.width != image.height:
        raise ValueError(f"shapes-world images are square, got {image.width}x{image.height}; crop it to a square")
    image = image.convert("RGB")
    if image.size != (CANVAS, CANVAS):
        image = image.resize((CANVAS, CANVAS), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """The background colour most border pixels are nearest to, and its RGB as drawn: the median of those
    pixels (a decoder may shift it a little, and every blend is measured from it)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])  # (n, 3)
    nearest = np.linalg.norm(border[:, None] - _BACKGROUND_RGB[None], axis=-1).argmin(axis=1)
    index = np.bincount(nearest, minlength=len(BACKGROUNDS)).argmax()
    return list(BACKGROUNDS)[index], np.median(border[nearest == index], axis=0)


def _blend(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) index into COLORS of each pixel's nearest blend of the background with a palette colour, and
    (H, W) amount of that colour in [0, 1] (0 for colours outside the palette).

    Nearest palette colour alone would call the edge of a red shape on white orange; the nearest blend does not.
    """
    direction = _OBJECT_RGB - background                                          # (6, 3)
    offset = pixels - background                                                  # (H, W, 3)
    amount = np.clip(offset @ direction.T / (direction**2).sum(axis=1), 0, 1)     # (H, W, 6)
    distance = np.linalg.norm(offset[..., None, :] - amount[..., None] * direction, axis=-1)  # (H, W, 6)
    nearest = distance.argmin(axis=-1)
    chosen = np.take_along_axis(amount, nearest[..., None], axis=-1)[..., 0]
    return nearest, np.where(distance.min(axis=-1) <= MAX_COLOR_DISTANCE, chosen, 0.0)


def _connected_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class: (H, W) labels, 0 where the class is -1.

    Every pixel starts with its own label and repeatedly takes the smallest label among its same-class
    neighbours; jumping to the label of the pixel a label names halves the distance each round.
    """
    height, width = classes.shape
    inside = classes >= 0
    labels = np.where(inside, np.arange(1, height * width + 1).reshape(height, width), 0)
    padded_classes = np.pad(classes, 1, constant_values=-1)
    while True:
        padded = np.pad(labels, 1)
        smallest = labels.copy()
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # up, down, left, right in the padded frame
            neighbour = padded[dy:dy + height, dx:dx + width]
            same = (padded_classes[dy:dy + height, dx:dx + width] == classes) & inside
            smallest = np.where(same & (neighbour < smallest), neighbour, smallest)
        smallest[inside] = smallest.flat[smallest[inside] - 1]
        if np.array_equal(smallest, labels):
            return labels
        labels = smallest


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask and every pixel within `steps` 4-neighbour steps of it."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return mask


def _describe(weights: np.ndarray, color: str) -> DetectedObject:
    """Shape, size and box from the mass of one object (amount of its colour per pixel).

    Mass per row and per column stays put under blur where a thresholded outline does not: the widest row and
    the tallest column are the object's width and height, mass over width times height is its fill ratio, and
    the skewness of the row masses tells a triangle (it widens downwards) from a circle or square.
    """
    rows, columns = weights.sum(axis=1), weights.sum(axis=0)
    mass, width, height = rows.sum(), rows.max(), columns.max()
    centres = np.arange(len(rows)) + 0.5  # pixel j spans [j, j + 1)
    x, y = (columns @ centres) / mass, (rows @ centres) / mass
    spread = np.sqrt(rows @ (centres - y) ** 2 / mass)
    skew = rows @ (centres - y) ** 3 / mass / spread**3 if spread > 0 else 0.0  # a single row has no skew
    shape = "triangle" if skew < TRIANGLE_SKEW else "square" if mass / (width * height) > SQUARE_FILL else "circle"
    if shape == "triangle":
        y -= height / 6  # a triangle's mass centre lies a sixth of its height below its box centre
    size = "large" if max(width, height) > LARGE_EXTENT else "small"
    box = (x - width / 2, y - height / 2, x + width / 2, y + height / 2)
    return DetectedObject(shape, color, size, float(x), float(y), tuple(map(float, box)), float(mass))


# ------------------------------------------------------------------------------------------------- prompts

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "background", "size")
LANGUAGES = ("en", "ja")
SPLITS = ("seen", "held_out")
PROMPT_SEED = 0
SAMPLED_PER_SPLIT = 16  # categories with too many combinations to list take this many of each split


@dataclass(frozen=True)
class Wanted:
    """One requested object: colour and shape, and a size only where the prompt names one."""

    color: str
    shape: str
    size: str | None = None

    def matches(self, obj: DetectedObject) -> bool:
        return (obj.color, obj.shape) == (self.color, self.shape) and self.size in (None, obj.size)


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt and what it asks for; `text` and `split` follow from the content.

    objects: the requested objects (counting repeats one object n times); relation: position prompts ask for
    objects[0] to lie `relation` objects[1]; background: background prompts ask for it.
    """

    category: str
    language: str
    objects: tuple[Wanted, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; choose one of {CATEGORIES}")
        if self.language not in LANGUAGES:
            raise ValueError(f"unknown language {self.language!r}; choose one of {LANGUAGES}")

    @property
    def split(self) -> str:
        held_out = any((wanted.color, wanted.shape) in HELD_OUT for wanted in self.objects)
        return "held_out" if held_out else "seen"

    @property
    def text(self) -> str:
        """Built only from the caption phrases of `ldm.data.shapes`, the grammar the model was trained on."""
        objects = [ShapeObject(w.shape, w.color, w.size or SIZES[0]) for w in self.objects]
        phrases = [object_phrase(obj, self.language, self.category == "size") for obj in objects]
        if self.category == "counting":
            return count_phrase(objects[0], len(objects), self.language)
        if self.category == "position":
            return relation_phrase(objects[0], self.relation, objects[1], self.language, with_size=False)
        if self.category == "background":
            return with_background(phrases[0], self.background, self.language)
        return list_phrase(phrases, self.language)

    def to_dict(self) -> dict:
        return {**asdict(self), "split": self.split, "text": self.text}


def shape_eval_prompts(languages: Sequence[str] = LANGUAGES, limit_per_category: int | None = None,
                       seed: int = PROMPT_SEED) -> list[EvalPrompt]:
    """The ShapeEval prompt list, the same for a given seed; every content appears in each language.

    Small categories list every combination (single_object, counting, size); the others sample
    SAMPLED_PER_SPLIT seen and as many held-out contents. Within a category seen and held-out contents
    alternate, so `limit_per_category` (contents per category and language) keeps both splits.
    """
    unknown = set(languages) - set(LANGUAGES)
    if unknown or not languages:
        raise ValueError(f"languages must be a non-empty subset of {LANGUAGES}, got {tuple(languages)}")
    if limit_per_category is not None and limit_per_category < 1:
        raise ValueError(f"limit_per_category={limit_per_category} must be at least 1 (or None for all)")
    rng = np.random.default_rng(seed)
    prompts = []
    for category, contents in _contents(rng).items():
        for language in languages:
            prompts += [EvalPrompt(category, language, *content) for content in contents[:limit_per_category]]
    return prompts


def _contents(rng: np.random.Generator) -> dict[str, list[tuple]]:
    """Per category, (objects, relation, background) tuples in split-alternating order."""
    looks = [Wanted(color, shape) for color in COLORS for shape in SHAPES]
    pairs = [_shuffled_pair(rng, (a, b)) for i, a in enumerate(looks) for b in looks[i + 1:]]
    listed = {
        "single_object": [((look,),) for look in looks],
        "counting": [((look,) * count,) for look in looks for count in (2, 3)],
        "size": [((Wanted(look.color, look.shape, size),),) for look in looks for size in SIZES],
    }
    sampled = {
        "two_objects": [(pair,) for pair in pairs],
        "colors": [(pair,) for pair in pairs if pair[0].color != pair[1].color and pair[0].shape != pair[1].shape],
        "position": [(pair,) for pair in pairs],
        "background": [((look,), None, background) for look in looks for background in BACKGROUNDS],
    }
    splits = {name: _by_split(rng, listed[name]) for name in listed}
    splits |= {name: _by_split(rng, sampled[name], SAMPLED_PER_SPLIT) for name in sampled}
    # each split of position cycles through the four directions, so every direction is asked equally often
    splits["position"] = [[(pair, RELATIONS[i % len(RELATIONS)]) for i, (pair,) in enumerate(part)]
                          for part in splits["position"]]
    return {name: _interleave(*splits[name]) for name in CATEGORIES}


def _shuffled_pair(rng: np.random.Generator, pair: tuple[Wanted, Wanted]) -> tuple[Wanted, Wanted]:
    return pair if rng.random() < 0.5 else pair[::-1]


def _by_split(rng: np.random.Generator, contents: list[tuple], per_split: int | None = None) -> list[list[tuple]]:
    """[seen, held-out] contents, each shuffled and cut to per_split."""
    def held_out(content):
        return any((wanted.color, wanted.shape) in HELD_OUT for wanted in content[0])

    parts = [[content for content in contents if held_out(content) == flag] for flag in (False, True)]
    return [[part[i] for i in rng.permutation(len(part))][:per_split] for part in parts]


def _interleave(seen: list[tuple], held_out: list[tuple]) -> list[tuple]:
    """seen, held-out, seen, ... and then the rest of the longer list: any prefix holds both splits."""
    merged = [content for both in zip(seen, held_out) for content in both]
    return merged + seen[len(held_out):] + held_out[len(seen):]


# ------------------------------------------------------------------------------------------------- scoring

def score(prompt: EvalPrompt, detection: Detection) -> bool:
    """Whether the detected image shows what the prompt asks for, by the rule of its category:

    single_object, two_objects, colors: every requested object is present with its colour on its shape (so a
        red circle and a blue square fail "a blue circle and a red square"); other objects may appear too.
    size: the requested object is present at the requested size.
    background: the background is the requested one and the requested object is present.
    counting: exactly the requested number of objects of that colour and shape, and no other object at all.
    position: both objects are present and the first lies in the requested direction from the second, by
        centres: the offset along the requested axis points the right way and is at least as long as the offset
        across it. This is looser than `shapes.relation` (which the training captions use, 1.5 times as long),
        because a model need not copy the margin of its training layouts to say "left of" clearly.
    """
    present = _all_present(prompt.objects, detection.objects)
    if prompt.category == "counting":
        return present and len(detection.objects) == len(prompt.objects)
    if prompt.category == "background":
        return present and detection.background == prompt.background
    if prompt.category == "position":
        first, second = prompt.objects
        return any(lies(a, prompt.relation, b) for a in detection.objects for b in detection.objects
                   if a is not b and first.matches(a) and second.matches(b))
    return present


def _all_present(wanted: tuple[Wanted, ...], objects: tuple[DetectedObject, ...]) -> bool:
    """Each requested object has its own match: a request repeated n times needs n matching objects.

    Counting per distinct request is exact because the prompts never request overlapping objects.
    """
    return all(sum(w.matches(obj) for obj in objects) >= n for w, n in Counter(wanted).items())


def scene_for_prompt(prompt: EvalPrompt, rng: np.random.Generator) -> Scene:
    """A random scene that satisfies the prompt (sizes and background at random where it names none): the
    ground truth a perfect model could draw, for checking the evaluation and a pipeline end to end."""
    objects = [ShapeObject(w.shape, w.color, w.size or SIZES[rng.integers(len(SIZES))]) for w in prompt.objects]
    background = prompt.background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    while True:
        placed = place(rng, objects)  # the world's own non-touching layout
        if placed is not None and (prompt.relation is None or relation(*placed) == prompt.relation):
            return Scene(background, tuple(placed))


# ------------------------------------------------------------------------------------------------- evaluation

Generate = Callable[[list[str], list[int]], Sequence[Image.Image]]


@dataclass(frozen=True)
class EvalRecord:
    prompt: EvalPrompt
    seed: int
    detection: Detection
    correct: bool

    def to_dict(self) -> dict:
        return {"prompt": self.prompt.to_dict(), "seed": self.seed, "correct": self.correct,
                "detection": asdict(self.detection)}


@dataclass
class EvalReport:
    records: list[EvalRecord] = field(default_factory=list)

    def accuracy(self, category: str | None = None, split: str | None = None,
                 language: str | None = None) -> float | None:
        """Fraction of correct images among those matching every given filter (None when there are none)."""
        chosen = [record.correct for record in self.records
                  if category in (None, record.prompt.category) and split in (None, record.prompt.split)
                  and language in (None, record.prompt.language)]
        return sum(chosen) / len(chosen) if chosen else None

    def overall(self, split: str | None = None, language: str | None = None) -> float | None:
        """Mean of the category accuracies, as GenEval reports it: each category weighs the same."""
        scores = [a for a in (self.accuracy(c, split, language) for c in CATEGORIES) if a is not None]
        return sum(scores) / len(scores) if scores else None

    def by(self, *fields: str) -> dict[tuple, float]:
        """Accuracy per combination of the given fields ("category", "split", "language") that has images."""
        if not set(fields) <= {"category", "split", "language"}:
            raise ValueError(f"fields must be among 'category', 'split', 'language', got {fields}")
        keys = dict.fromkeys(tuple(getattr(r.prompt, name) for name in fields) for r in self.records)
        return {key: self.accuracy(**dict(zip(fields, key))) for key in keys}

    def table(self) -> str:
        """Markdown: a row per category and the overall mean, a column per split and language and all."""
        columns = [(split, language) for split in SPLITS for language in LANGUAGES] + [(None, None)]
        names = [f"{split.replace('_', '-')} {language.upper()}" for split, language in columns[:-1]] + ["all"]
        rows = [(category, [self.accuracy(category, split, language) for split, language in columns])
                for category in CATEGORIES]
        rows.append(("**overall**", [self.overall(split, language) for split, language in columns]))
        return markdown_table("category", names, rows)

    def to_json(self) -> str:
        summary = {
            "overall": self.overall(),
            **{f"by_{'_'.join(fields)}": {"/".join(key): value for key, value in self.by(*fields).items()}
               for fields in (("category",), ("split",), ("language",), ("category", "split", "language"))},
        }
        return json.dumps({**summary, "records": [r.to_dict() for r in self.records]}, ensure_ascii=False)


def markdown_table(corner: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[float | None]]]) -> str:
    """A markdown table of rates: a header (`corner` above the row names), then one line per (name, cells)."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(map(_cell, cells)) + " |" for name, cells in rows]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def evaluate(generate: Generate, prompts: Sequence[EvalPrompt], images_per_prompt: int = 4, seed: int = 0,
             batch_size: int = 64, progress: bool = True) -> EvalReport:
    """Generate images_per_prompt images for every prompt, detect their content and score them.

    Image k of every prompt gets seed + k, so a prompt's images do not depend on which other prompts are
    evaluated. `generate(texts, seeds)` returns one image per text (the caller wraps its pipeline).
    """
    if not prompts:
        raise ValueError("no prompts to evaluate; build them with shape_eval_prompts()")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt} and batch_size={batch_size} must be at least 1")
    jobs = [(prompt, seed + k) for prompt in prompts for k in range(images_per_prompt)]
    report = EvalReport()
    with tqdm(total=len(jobs), disable=not progress, desc="ShapeEval") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            images = list(generate([prompt.text for prompt, _ in batch], [image_seed for _, image_seed in batch]))
            if len(images) != len(batch):
                raise ValueError(f"generate returned {len(images)} images for {len(batch)} texts; it must return "
                                 "one image per text, in order")
            for (prompt, image_seed), image in zip(batch, images):
                detection = detect(image)
                report.records.append(EvalRecord(prompt, image_seed, detection, score(prompt, detection)))
            bar.update(len(batch))
    return report


def evaluate_model(model: str, steps: int = 20, guidance: float = 5.0, images_per_prompt: int = 4,
                   limit: int | None = None, progress: bool = True, candidates: int | None = 1) -> EvalReport:
    """ShapeEval of a text-to-image model: an embedded model's name, a diffusers folder or a checkpoint file.
    `limit` takes that many prompts per category and split, for a quick reading. `candidates`: images drawn per
    scored image, the one its prompt fits best kept (`ldm.candidates.prompt_fit`); 1 scores the plain draw, None
    the model's recommendation."""
    import torch

    from ldm.pipeline import LatentDiffusionPipeline  # here: scoring alone needs no model code

    pipe = LatentDiffusionPipeline.from_pretrained(model)
    pipe.progress_bar = False

    def generate(texts, seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return pipe(texts, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    num_candidates=candidates).images

    return evaluate(generate, shape_eval_prompts(limit_per_category=limit), images_per_prompt, progress=progress)


@dataclass(frozen=True)
class ShapeEvalProbe:
    """A quick ShapeEval that tracks a training run: the trainer scores each evaluated export with it (config
    `evaluation: {target: ldm.evaluation.ShapeEvalProbe, params: {limit: 4}}`). Fixed prompts and seeds, so
    readings at different steps differ by what the model learned, not by what was asked."""
    limit: int = 4
    images_per_prompt: int = 1
    steps: int = 20
    guidance: float = 5.0

    def __call__(self, model: Path) -> dict[str, float | None]:
        report = evaluate_model(str(model), self.steps, self.guidance, self.images_per_prompt, self.limit,
                                progress=False)
        return {"overall": report.overall(), **{category: report.accuracy(category) for category in CATEGORIES},
                **{f"overall/{split}": report.overall(split=split) for split in SPLITS},
                **{f"overall/{language}": report.overall(language=language) for language in LANGUAGES}}

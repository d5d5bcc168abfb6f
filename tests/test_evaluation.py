"""ShapeEval: the detector against rendered ground truth, each scoring rule on built detections, the prompt
list, and evaluate() end to end with a perfect and a blank generator."""

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ldm.data.shapes import (
    BACKGROUNDS, COLORS, HALF_EXTENT, HELD_OUT, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, ShapesDataset,
    render,
)
from ldm.evaluation import (
    CATEGORIES, DetectedObject, Detection, EvalPrompt, Wanted, detect, evaluate, scene_for_prompt, score,
    shape_eval_prompts,
)

POSITION_TOLERANCE = 1.0  # pixels of the 64-pixel canvas; measured errors stay under 0.7 up to blur radius 1.5


def matches_scene(detection: Detection, scene: Scene) -> bool:
    """Same background, and a one-to-one match of objects by shape, colour, size and centre."""
    if detection.background != scene.background or len(detection.objects) != len(scene.objects):
        return False
    unmatched = list(detection.objects)
    for truth in scene.objects:
        found = [obj for obj in unmatched if (obj.shape, obj.color, obj.size) == (truth.shape, truth.color, truth.size)
                 and abs(obj.x - truth.x) <= POSITION_TOLERANCE and abs(obj.y - truth.y) <= POSITION_TOLERANCE]
        if not found:
            return False
        unmatched.remove(found[0])
    return True


# ------------------------------------------------------------------------------------------------- detector

@pytest.mark.parametrize("canvas, blur_radius", [(64, 0.0), (64, 0.6), (64, 1.0), (128, 0.8), (256, 0.0)])
def test_detector_recovers_ground_truth_scenes(canvas, blur_radius):
    dataset = ShapesDataset(seed=7)
    scenes = [dataset.scene(i) for i in range(300 if canvas == 64 else 100)]
    correct = 0
    for scene in scenes:
        image = render(scene, canvas)
        if blur_radius:
            image = image.filter(ImageFilter.GaussianBlur(blur_radius * canvas / 64))
        correct += matches_scene(detect(image), scene)
    assert correct / len(scenes) >= 0.99


@pytest.mark.parametrize("background", sorted(BACKGROUNDS))
def test_every_single_object_is_measured_exactly(background):
    area_per_half_extent_squared = {"square": 4.0, "circle": math.pi, "triangle": 2.0}
    for color in COLORS:
        for shape in SHAPES:
            for size in SIZES:
                truth = ShapeObject(shape, color, size, 30.3, 33.7)
                detection = detect(render(Scene(background, (truth,))))
                assert detection.background == background
                (found,) = detection.objects
                assert (found.shape, found.color, found.size) == (shape, color, size)
                assert (found.x, found.y) == pytest.approx((truth.x, truth.y), abs=0.25)
                r = HALF_EXTENT[size]
                # a triangle's widest row is its half-covered base row: its box is a pixel narrower
                assert found.box == pytest.approx((truth.x - r, truth.y - r, truth.x + r, truth.y + r), abs=0.75)
                # the renderer fills the end pixels of its supersampled grid: shapes are up to 4% larger
                assert found.area == pytest.approx(area_per_half_extent_squared[shape] * r * r * 1.02, rel=0.03)


def _rounded_square(size: str, corner: float, background: str = "white", color: str = "blue") -> Image.Image:
    """A square with rounded corners, as a VAE reconstructs one, drawn like the renderer (4x, then BOX)."""
    scale, r = 4, HALF_EXTENT[size]
    canvas = Image.new("RGB", (64 * scale,) * 2, BACKGROUNDS[background])
    box = [(32 - r) * scale, (32 - r) * scale, (32 + r) * scale, (32 + r) * scale]
    ImageDraw.Draw(canvas).rounded_rectangle(box, radius=corner * scale, fill=COLORS[color])
    return canvas.resize((64, 64), Image.BOX)


@pytest.mark.parametrize("size", SIZES)
def test_rounded_and_blurred_squares_stay_squares(size):
    for image in (_rounded_square(size, corner=3), _rounded_square(size, corner=3).filter(ImageFilter.GaussianBlur(1))):
        (found,) = detect(image).objects
        assert (found.shape, found.size, found.x, found.y) == pytest.approx(("square", size, 32, 32), abs=0.3)


def test_images_of_other_sizes_give_the_same_objects():
    scene = Scene("gray", (ShapeObject("circle", "orange", "large", 40.0, 20.0),
                           ShapeObject("triangle", "purple", "small", 20.5, 44.0)))  # top to bottom, as detected
    for canvas in (32, 48, 200, 512):
        found = detect(render(scene, canvas)).objects
        assert [(o.shape, o.color, o.size) for o in found] == [(o.shape, o.color, o.size) for o in scene.objects]
        assert [coordinate for o in found for coordinate in (o.x, o.y)] == \
               pytest.approx([coordinate for o in scene.objects for coordinate in (o.x, o.y)], abs=0.6)


def test_specks_and_colours_outside_the_palette_are_not_objects():
    pixels = np.full((64, 64, 3), 255, np.uint8)
    pixels[10:13, 10:13] = COLORS["red"]    # 9 pixels: below the smallest object's quarter
    pixels[40, 50] = COLORS["blue"]
    image = Image.fromarray(pixels)
    assert detect(image) == Detection("white", ())
    black = Image.new("RGB", (64, 64), BACKGROUNDS["black"])
    ImageDraw.Draw(black).rectangle((20, 20, 40, 40), fill=(255, 255, 255))  # white is no object colour
    assert detect(black) == Detection("black", ())


def test_touching_objects_of_different_colours_stay_apart():
    scene = Scene("white", (ShapeObject("square", "red", "small", 20.0, 32.0),
                            ShapeObject("square", "orange", "small", 32.0, 32.0)))  # edges meet at x = 26
    found = detect(render(scene)).objects
    assert [(o.shape, o.color) for o in sorted(found, key=lambda o: o.x)] == [("square", "red"), ("square", "orange")]


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="square"):
        detect(Image.new("RGB", (64, 32)))
    with pytest.raises(ValueError, match="PIL image"):
        detect(np.zeros((64, 64, 3), np.uint8))


# ------------------------------------------------------------------------------------------------- scoring

def obj(shape: str, color: str, x: float = 32, y: float = 32, size: str = "small") -> DetectedObject:
    r = HALF_EXTENT[size]
    return DetectedObject(shape, color, size, x, y, (x - r, y - r, x + r, y + r), 4 * r * r)


def scored(category, objects, detected, drawn_background="white", **content) -> bool:
    return score(EvalPrompt(category, "en", objects, **content), Detection(drawn_background, tuple(detected)))


RED_CIRCLE, BLUE_SQUARE = Wanted("red", "circle"), Wanted("blue", "square")


def test_single_object_needs_the_object_and_allows_others():
    assert scored("single_object", (RED_CIRCLE,), [obj("circle", "red")])
    assert scored("single_object", (RED_CIRCLE,), [obj("circle", "red"), obj("square", "blue", 50)])
    assert not scored("single_object", (RED_CIRCLE,), [obj("circle", "blue")])
    assert not scored("single_object", (RED_CIRCLE,), [obj("square", "red")])
    assert not scored("single_object", (RED_CIRCLE,), [])


@pytest.mark.parametrize("category", ["two_objects", "colors"])
def test_two_objects_and_colors_need_both_objects_bound(category):
    wanted = (RED_CIRCLE, BLUE_SQUARE)
    assert scored(category, wanted, [obj("square", "blue", 10), obj("circle", "red", 50)])
    assert not scored(category, wanted, [obj("circle", "red")])
    assert not scored(category, wanted, [obj("circle", "blue", 10), obj("square", "red", 50)])  # colours swapped


def test_counting_needs_exactly_n_and_nothing_else():
    three = (Wanted("yellow", "triangle"),) * 3
    triangles = [obj("triangle", "yellow", x) for x in (10, 30, 50)]
    assert scored("counting", three, triangles)
    assert not scored("counting", three, triangles[:2])
    assert not scored("counting", three, triangles + [obj("triangle", "yellow", 30, 55)])
    assert not scored("counting", three, triangles + [obj("circle", "red", 30, 55)])
    assert not scored("counting", three, triangles[:2] + [obj("triangle", "green", 50)])


@pytest.mark.parametrize("where, a_at, b_at", [
    ("left of", (10, 30), (50, 40)), ("right of", (50, 40), (10, 30)),
    ("above", (30, 10), (40, 50)), ("below", (40, 50), (30, 10)),
])
def test_position_holds_along_the_dominant_axis(where, a_at, b_at):
    wanted = (RED_CIRCLE, BLUE_SQUARE)
    layout = [obj("circle", "red", *a_at), obj("square", "blue", *b_at)]
    for other in RELATIONS:  # the layout satisfies the requested direction and no other
        assert scored("position", wanted, layout, relation=other) == (other == where)
    assert not scored("position", wanted, [obj("circle", "red", *b_at), obj("square", "blue", *a_at)], relation=where)
    assert not scored("position", wanted, layout[:1], relation=where)


def test_position_rejects_a_diagonal_where_the_other_axis_dominates():
    # red is 10 to the left of blue but 30 above it: that reads "above", not "left of"
    layout = [obj("circle", "red", 20, 10), obj("square", "blue", 30, 40)]
    assert not scored("position", (RED_CIRCLE, BLUE_SQUARE), layout, relation="left of")
    assert scored("position", (RED_CIRCLE, BLUE_SQUARE), layout, relation="above")


def test_background_needs_background_and_object():
    wanted = (Wanted("red", "square"),)
    assert scored("background", wanted, [obj("square", "red")], "black", background="black")
    assert not scored("background", wanted, [obj("square", "red")], "white", background="black")
    assert not scored("background", wanted, [obj("circle", "red")], "black", background="black")


def test_size_needs_the_requested_size():
    wanted = (Wanted("blue", "square", "large"),)
    assert scored("size", wanted, [obj("square", "blue", size="large")])
    assert not scored("size", wanted, [obj("square", "blue", size="small")])
    assert not scored("size", wanted, [obj("square", "red", size="large")])


# ------------------------------------------------------------------------------------------------- prompts

def test_prompt_texts_come_from_the_caption_grammar():
    red_circle, blue_square = Wanted("red", "circle"), Wanted("blue", "square")
    expected = {
        ("single_object", (red_circle,), None, None): ("a red circle", "赤い丸"),
        ("two_objects", (red_circle, blue_square), None, None): ("a red circle and a blue square",
                                                                 "赤い丸と青い四角"),
        ("counting", (Wanted("yellow", "triangle"),) * 2, None, None): ("two yellow triangles",
                                                                        "黄色い三角が二つ"),
        ("position", (red_circle, blue_square), "left of", None): ("a red circle to the left of a blue square",
                                                                   "青い四角の左に赤い丸"),
        ("background", (Wanted("red", "square"),), None, "black"): ("a red square on a black background",
                                                                     "黒い背景に赤い四角"),
        ("size", (Wanted("red", "triangle", "small"),), None, None): ("a small red triangle", "小さい赤い三角"),
    }
    for (category, objects, where, background), texts in expected.items():
        made = [EvalPrompt(category, language, objects, where, background).text for language in ("en", "ja")]
        assert tuple(made) == texts


def test_prompt_list_is_fixed_balanced_and_split_by_held_out_pairs():
    prompts = shape_eval_prompts()
    assert prompts == shape_eval_prompts()
    for category in CATEGORIES:
        english = [p for p in prompts if p.category == category and p.language == "en"]
        japanese = [p for p in prompts if p.category == category and p.language == "ja"]
        assert [(p.objects, p.relation, p.background) for p in english] == \
               [(p.objects, p.relation, p.background) for p in japanese]  # translations of each other
        assert 18 <= len(english) <= 40
        assert {p.split for p in english} == {"seen", "held_out"}
    for prompt in prompts:
        mentions_held_out = any((w.color, w.shape) in HELD_OUT for w in prompt.objects)
        assert prompt.split == ("held_out" if mentions_held_out else "seen")
    position = [p for p in prompts if p.category == "position" and p.language == "en"]
    assert {r: sum(p.relation == r for p in position) for r in RELATIONS} == {r: 8 for r in RELATIONS}


def test_limit_keeps_both_splits_in_every_category():
    prompts = shape_eval_prompts(languages=("ja",), limit_per_category=2)
    assert len(prompts) == 2 * len(CATEGORIES)
    for category in CATEGORIES:
        assert sorted(p.split for p in prompts if p.category == category) == ["held_out", "seen"]
    with pytest.raises(ValueError, match="languages"):
        shape_eval_prompts(languages=("fr",))


# ------------------------------------------------------------------------------------------------- evaluate

def perfect_generator(prompts):
    """Renders, for each text, a scene that satisfies its prompt (seeded by the image seed)."""
    by_text = {prompt.text: prompt for prompt in prompts}

    def generate(texts, seeds):
        scenes = [scene_for_prompt(by_text[text], np.random.default_rng(seed)) for text, seed in zip(texts, seeds)]
        return [render(scene) for scene in scenes]
    return generate


def test_perfect_images_score_one_everywhere():
    prompts = shape_eval_prompts()
    report = evaluate(perfect_generator(prompts), prompts, images_per_prompt=1, batch_size=100, progress=False)
    assert len(report.records) == len(prompts)
    assert all(value == 1.0 for value in report.by("category", "split", "language").values())
    assert report.overall() == 1.0
    assert "| **overall** | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in report.table()


def test_blank_images_score_zero_and_the_report_adds_up():
    prompts = shape_eval_prompts(limit_per_category=4)
    seeds_seen = []

    def blank(texts, seeds):
        seeds_seen.extend(seeds)
        return [Image.new("RGB", (64, 64), BACKGROUNDS["white"]) for _ in texts]

    report = evaluate(blank, prompts, images_per_prompt=3, seed=10, batch_size=7, progress=False)
    assert seeds_seen == [10, 11, 12] * len(prompts)
    assert report.overall() == 0.0 and report.accuracy() == 0.0
    lines = report.table().splitlines()
    assert lines[0] == "| category | seen EN | seen JA | held-out EN | held-out JA | all |"
    assert len(lines) == 2 + len(CATEGORIES) + 1
    summary = json.loads(report.to_json())
    assert summary["by_category"] == {category: 0.0 for category in CATEGORIES}
    assert len(summary["records"]) == 3 * len(prompts)
    assert summary["records"][0]["prompt"]["text"] == prompts[0].text


def test_evaluate_refuses_a_generator_that_drops_images():
    prompts = shape_eval_prompts(limit_per_category=1)
    with pytest.raises(ValueError, match="one image per text"):
        evaluate(lambda texts, seeds: [], prompts, progress=False)

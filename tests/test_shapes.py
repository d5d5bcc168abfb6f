"""The shapes world: exact palette, no touching objects, held-out pairs never shown, captions that tell the truth."""

from __future__ import annotations

from dataclasses import replace
import re

import numpy as np
import pytest

from ldm.data.shapes import (
    BACKGROUNDS, CANVAS, COLORS, HALF_EXTENT, HELD_OUT, RELATIONS, Contradiction, OppositeRelation, OtherColors,
    JA_COLORS, JA_SHAPES, OtherCount, RelationTokenLabels, Scene, ShapeObject, ShapesDataset, _looks, captions,
    code_switched, lies, object_phrase, relation, render,
)

SCENES = [ShapesDataset(seed=0).scene(index) for index in range(1500)]


def test_palette_and_backgrounds_are_exact():
    assert COLORS == {"red": (230, 25, 45), "green": (40, 180, 75), "blue": (30, 90, 220), "yellow": (250, 215, 30),
                      "purple": (145, 50, 180), "orange": (245, 130, 35)}
    assert BACKGROUNDS == {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
    scene = Scene("gray", (ShapeObject("square", "purple", "large", 20.0, 30.0),))
    pixels = np.asarray(render(scene))
    assert tuple(pixels[30, 20]) == COLORS["purple"] and tuple(pixels[2, 2]) == BACKGROUNDS["gray"]
    assert render(scene, 128).size == (128, 128)


def test_scenes_have_one_to_three_separate_objects_inside_the_canvas():
    counts = {len(scene.objects) for scene in SCENES}
    assert counts == {1, 2, 3}
    for scene in SCENES:
        for i, a in enumerate(scene.objects):
            assert a.half_extent <= a.x <= CANVAS - a.half_extent and a.half_extent <= a.y <= CANVAS - a.half_extent
            for b in scene.objects[i + 1:]:
                reach = a.half_extent + b.half_extent
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach  # boxes never overlap or touch
    assert HALF_EXTENT["large"] >= 2 * HALF_EXTENT["small"]  # sizes clearly distinct


def test_held_out_pairs_never_appear_in_images_or_captions():
    seen = {(obj.color, obj.shape) for scene in SCENES for obj in scene.objects}
    assert seen.isdisjoint(HELD_OUT) and len(seen) == 15
    texts = " | ".join(text for scene in SCENES[:400] for text in captions(scene))
    for phrase in ("purple triangle", "orange circle", "green square", "紫の三角", "オレンジの丸", "緑の四角"):
        assert phrase not in texts


def test_code_switched_captions_swap_one_kind_of_word_into_the_other_language():
    assert code_switched("a red circle to the left of a blue square", "colors") == "a 赤い circle to the left of a 青い square"
    assert code_switched("two yellow triangles on a black background", "shapes") == "two yellow 三角 on a black background"
    assert code_switched("青い四角の左に赤い丸", "shapes") == "青い square の左に赤い circle"
    assert code_switched("黒い背景に紫の四角が二つ", "colors") == "黒い背景に purple 四角が二つ"  # backgrounds stay
    assert code_switched("灰色の背景にオレンジの三角", "colors") == "灰色の背景に orange 三角"


def _in_english(text: str) -> str:
    """Every Japanese colour and shape word of a (possibly mixed) caption in English, for reading its pairs."""
    for words in (JA_COLORS, JA_SHAPES):
        for english, japanese in words.items():
            text = text.replace(japanese, f" {english} ")
    return " ".join(text.split())


def test_code_switching_adds_two_mixed_captions_per_language_that_tell_the_truth():
    """With code_switching, each language gets one colour-switched and one shape-switched phrasing of one of its own
    captions; the pairs they name are the scene's (so a held-out pair is never named, in any mix)."""
    dataset, plain = ShapesDataset(seed=0, code_switching=True), ShapesDataset(seed=0)
    for index in range(300):
        mixed = [text for text in dataset[index]["captions"] if text not in plain[index]["captions"]]
        assert len(mixed) == 4
        looks = {(obj.color, obj.shape) for obj in dataset.scene(index).objects}
        for text in mixed:
            assert not text.isascii() and re.search("[a-z]", text), text  # both languages inside
            named = set(re.findall(rf"\b({'|'.join(COLORS)}) ({'|'.join(JA_SHAPES)})s?\b", _in_english(text)))
            assert named and named <= looks, text
    with pytest.raises(ValueError, match="code_switching mixes two languages"):
        ShapesDataset(languages=("en",), code_switching=True)


def test_spatial_captions_match_the_geometry():
    left, right = ShapeObject("circle", "red", "small", 10.0, 30.0), ShapeObject("square", "blue", "large", 45.0, 33.0)
    assert relation(left, right) == "left of" and relation(right, left) == "right of"
    texts = captions(Scene("white", (left, right)))
    assert "a red circle to the left of a blue square" in texts
    assert "a blue square to the right of a red circle" in texts
    assert "青い四角の左に赤い丸" in texts and "赤い丸の右に青い四角" in texts
    above = ShapeObject("triangle", "yellow", "small", 30.0, 8.0)
    below = ShapeObject("circle", "red", "small", 34.0, 50.0)
    assert "a yellow triangle above a red circle" in captions(Scene("black", (above, below)))
    assert relation(ShapeObject("circle", "red", "small", 10.0, 10.0),
                    ShapeObject("circle", "blue", "small", 40.0, 40.0)) is None  # diagonal: no clear relation


def test_relation_labels_give_the_side_of_the_object_named_after_the_relation():
    """The label of every relation caption is checked against the geometry: the object the rest of the caption
    names lies on the labelled side of the other one."""
    labels, checked = RelationTokenLabels(), 0
    for scene in SCENES:
        if len(scene.objects) != 2 or len({(o.color, o.shape) for o in scene.objects}) == 1:
            continue
        for text in captions(scene):
            found = labels(text)
            if found is None:
                continue
            prefix, label = found
            rest = text[len(prefix):].strip().split(" on a ")[0]  # without an English background suffix
            later = [obj for obj in scene.objects if rest in
                     {object_phrase(obj, language, with_size) for language in ("en", "ja") for with_size in (0, 1)}]
            earlier = [obj for obj in scene.objects if obj not in later]
            assert len(later) == 1 and lies(later[0], RELATIONS[label], earlier[0]), text
            checked += 1
    assert checked > 1000
    assert labels("a red circle and a blue square") is None and labels("黒い背景に赤い四角") is None


def test_the_opposite_relation_describes_the_scene_with_the_two_objects_swapped():
    """OppositeRelation's caption is false of the scene and true of it with the objects' places exchanged."""
    opposite, checked = OppositeRelation(), 0
    for scene in SCENES:
        if len(scene.objects) != 2:
            continue
        a, b = scene.objects
        swapped = Scene(scene.background, (replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)))
        true, true_of_swapped = set(captions(scene)), set(captions(swapped))
        for text in true:
            wrong = opposite(text)
            if wrong is None:
                assert text in true_of_swapped  # no relation: the swap changes nothing it says
                continue
            assert wrong not in true and wrong in true_of_swapped and opposite(wrong) == text, text
            checked += 1
    assert checked > 1000


def test_the_other_count_describes_the_scene_with_one_object_more_or_less():
    """OtherCount's caption is false of the scene, names the other count of the same look, and maps back."""
    other, checked = OtherCount(), 0
    for scene in SCENES:
        for text in captions(scene):
            wrong = other(text)
            if wrong is None:
                assert not any(number in text for number in ("two", "three", "二つ", "三つ")), text
                continue
            assert wrong not in captions(scene) and other(wrong) == text, text
            checked += 1
    assert checked > 300
    assert other("two red circles and a blue square") == "three red circles and a blue square"
    assert other("黒い背景に青い四角が三つ") == "黒い背景に青い四角が二つ"


def _recolored(scene: Scene, colors: dict[str, str]) -> Scene:
    return Scene(scene.background, tuple(replace(obj, color=colors.get(obj.color, obj.color)) for obj in scene.objects))


def test_other_colors_describe_the_scene_recoloured_and_never_a_held_out_pair():
    """OtherColors' caption is false of the scene and true of it with the colours changed as the caption says."""
    other, exchanged, recolored = OtherColors(), 0, 0
    for scene in SCENES[:600]:
        for text in captions(scene):
            wrong = other(text)
            if wrong is None:
                continue
            before, after = _looks(text), _looks(wrong)
            assert [shape for _, shape in before] == [shape for _, shape in after], (text, wrong)
            assert not HELD_OUT & set(after) and not re.search(r"\ban [^aeiou]|\ba [aeiou]", wrong), wrong
            colors = dict(zip([color for color, _ in before], [color for color, _ in after]))
            assert wrong not in captions(scene) and wrong in captions(_recolored(scene, colors)), (text, wrong)
            exchanged += len(set(colors)) > 1
            recolored += len(set(colors)) == 1
    assert exchanged > 500 and recolored > 500
    assert other("a red circle to the left of a blue square") == "a blue circle to the left of a red square"
    assert other("赤い丸と青い四角") == "青い丸と赤い四角"
    assert other("a yellow circle and a blue circle") not in ("a blue circle and a yellow circle", None)  # says the same
    assert _looks(other("a purple circle and a green triangle"))[1] == ("green", "triangle")  # no purple triangle


def test_a_contradiction_takes_the_first_kind_that_applies_and_names_unknown_kinds():
    both = Contradiction(["relation", "count"])
    assert both("a red circle above a blue square") == "a red circle below a blue square"
    assert both("three red circles") == "two red circles"
    assert both("a red circle") is None
    assert Contradiction()("three red circles") is None  # relations only by default
    every = Contradiction(["relation", "count", "color"])
    assert every("a red circle above a blue square") == "a red circle below a blue square"
    assert every("a red circle and a blue square") == "a blue circle and a red square"
    with pytest.raises(ValueError, match=r"kinds must be a non-empty list of \['relation', 'count', 'color'\]; "
                                         r"got \['size'\]"):
        Contradiction(["size"])


@pytest.mark.parametrize("scene, expected", [
    (Scene("white", (ShapeObject("circle", "red", "small"),)), ["a red circle", "赤い丸"]),
    (Scene("white", (ShapeObject("square", "blue", "large"),)), ["a large blue square", "大きい青い四角"]),
    (Scene("white", (ShapeObject("triangle", "yellow", "small", 10.0, 10.0),
                     ShapeObject("triangle", "yellow", "large", 40.0, 40.0))),
     ["two yellow triangles", "黄色い三角が二つ"]),
    (Scene("gray", (ShapeObject("circle", "green", "small", 10.0, 10.0), ShapeObject("circle", "green", "small", 30.0, 40.0),
                    ShapeObject("circle", "green", "small", 50.0, 10.0))), ["three green circles", "緑の丸が三つ"]),
    (Scene("white", (ShapeObject("triangle", "blue", "small", 10.0, 30.0),
                     ShapeObject("square", "red", "small", 45.0, 30.0))),
     ["a blue triangle and a red square", "青い三角と赤い四角"]),
    (Scene("black", (ShapeObject("square", "red", "small"),)),
     ["a red square on a black background", "黒い背景に赤い四角"]),
    (Scene("white", (ShapeObject("circle", "orange", "large"),)), ["an orange circle", "a large orange circle"]),
])
def test_caption_forms_from_the_issue(scene, expected):
    texts = captions(scene)
    for text in expected:
        assert text in texts


def test_dataset_items_are_reproducible_and_in_range():
    first, again = ShapesDataset(seed=4)[17], ShapesDataset(seed=4)[17]
    assert first["captions"] == again["captions"] and (first["image"] == again["image"]).all()
    assert first["image"].shape == (3, 64, 64) and first["image"].min() >= -1 and first["image"].max() <= 1
    assert ShapesDataset(seed=5).scene(17) != ShapesDataset(seed=4).scene(17)

"""Paired edits: reproducible, every category in both languages, words that read back to exactly their change,
geometry the world allows, and a scorer that passes the ground truth (also blurred) and fails the unedited image,
damaged bystanders, extra objects and botched changes, each on the right count."""

import hashlib
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import ImageFilter

from ldm.data.edits import (
    CATEGORIES, CATEGORY_SHARES, KINDS, LANGUAGES, MENTION_ATTRIBUTES, MIN_MOVE, RELATION_MARGIN, TWO_EDITS, Change,
    Edit, EditDataset, Mention, OppositeDirection, instructions, placed, sample_edit, unseen_instructions,
)
from ldm.data.shapes import (
    BACKGROUNDS, CANVAS, COLORS, HELD_OUT, OPPOSITE, RELATIONS, SHAPES, SIZES, Scene, ShapeObject, ShapesDataset,
    render, to_tensor, touching,
)
from ldm.edit_evaluation import EditCase, edit_eval_cases, evaluate_edits, score_edit

EDITS = [EditDataset(seed=0).edit(index) for index in range(1500)]
CASES = edit_eval_cases(languages=("en",), per_kind=12)


# ------------------------------------------------------------------------------------------------- sampling

def test_edits_are_a_pure_function_of_seed_and_index():
    first, again = EditDataset(seed=3, size=32)[17], EditDataset(seed=3, size=32)[17]
    assert first["instructions"] == again["instructions"] and first["kinds"] == again["kinds"]
    assert (first["source"] == again["source"]).all() and (first["target"] == again["target"]).all()
    edit = EditDataset(seed=3).edit(17)
    assert (first["source"] == to_tensor(render(edit.source, 32))).all()  # ShapesDataset's image convention
    assert (first["target"] == to_tensor(render(edit.target, 32))).all() and first["source"].shape == (3, 32, 32)
    assert EditDataset(seed=4).edit(17) != edit
    assert sample_edit(np.random.default_rng([5, 2]), "move") == sample_edit(np.random.default_rng([5, 2]), "move")


def test_every_category_and_kind_comes_in_both_languages_alike():
    shares = Counter(edit.category for edit in EDITS)
    assert set(shares) == set(CATEGORIES) and min(shares.values()) >= 0.05 * len(EDITS)
    paired = Counter(kind for edit in EDITS if edit.category == TWO_EDITS for kind in edit.kinds)
    assert set(paired) == set(KINDS)
    for index, edit in enumerate(EDITS[:300]):
        english, japanese = edit.instructions(("en",)), edit.instructions(("ja",))
        assert len(english) == len(japanese) >= 9 and len(set(english + japanese)) == len(english) * 2
        assert all(text.isascii() for text in english) and not any(text.isascii() for text in japanese)
        assert EditDataset(seed=0)[index]["instructions"] == english + japanese
        assert EditDataset(seed=0)[index]["kinds"] == edit.kinds
    assert EditDataset(seed=0, languages=("ja",))[0]["instructions"] == EDITS[0].instructions(("ja",))


def test_category_shares_choose_kinds_and_ordered_pairs():
    assert sample_edit(np.random.default_rng(1), "add+move").kinds == ("add", "move")
    dataset = EditDataset(seed=5, category_shares={"recolor": 1, "move+add": 3})  # shares need not sum to 1
    kinds = Counter(dataset.edit(index).kinds for index in range(400))
    assert set(kinds) == {("recolor",), ("move", "add")}
    assert 0.68 < kinds[("move", "add")] / 400 < 0.82  # 0.75 expected, ±3.3 standard deviations
    assert EditDataset(seed=5, category_shares=dict(CATEGORY_SHARES)).edit(7) == EditDataset(seed=5).edit(7)


RED_CIRCLE, BLUE_SQUARE = Mention("circle", "red"), Mention("square", "blue")


@pytest.mark.parametrize("changes, english, japanese", [
    ([Change("recolor", Mention("circle"), "blue")], "make the circle blue", "丸を青くして"),
    ([Change("recolor", Mention("square", "red"), "green")], "turn the red square green", "赤い四角を緑にして"),
    ([Change("background", value="black")], "make the background black", "背景を黒にして"),
    ([Change("move", RED_CIRCLE, where="left of", reference=BLUE_SQUARE)],
     "move the red circle to the left of the blue square", "赤い丸を青い四角の左に動かして"),
    ([Change("move", Mention("circle", size="large"), where="above")], "can you move the large circle to the top?",
     "大きい丸を上に動かしてください"),
    ([Change("add", Mention("triangle", "yellow"))], "add a yellow triangle", "黄色い三角を追加して"),
    ([Change("add", Mention("triangle", "orange", "small"), where="below", reference=RED_CIRCLE)],
     "please draw a small orange triangle below the red circle", "赤い丸の下に小さいオレンジの三角を描いて"),
    ([Change("remove", Mention("circle", "green"))], "remove the green circle", "緑の丸を消して"),
    ([Change("resize", BLUE_SQUARE, "large")], "make the blue square large", "青い四角を大きくして"),
    ([Change("recolor", Mention("circle"), "blue"), Change("background", value="black")],
     "make the circle blue and the background black", "丸を青くして、背景を黒くして"),
    ([Change("remove", RED_CIRCLE), Change("resize", Mention("triangle"), "small")],
     "can you delete the red circle and make the triangle smaller?", "赤い丸を消して、三角を小さくしてくれる？"),
])
def test_instruction_forms_from_the_issue(changes, english, japanese):
    assert english in instructions(changes, "en")
    assert japanese in instructions(changes, "ja")


def every_change(scene: Scene) -> set[Change]:
    """Every change words could state about the scene's objects, ambiguous ones included."""
    mentions = {Mention.of(obj, attributes) for obj in scene.objects for attributes in MENTION_ATTRIBUTES}
    new = [Mention(shape, color, size) for color in COLORS for shape in SHAPES for size in (None, *SIZES)]
    places = [(where, reference) for where in RELATIONS for reference in (None, *mentions)]
    return {
        *(Change("recolor", m, color) for m in mentions for color in COLORS),
        *(Change("resize", m, size) for m in mentions for size in SIZES),
        *(Change("remove", m) for m in mentions),
        *(Change("background", value=background) for background in BACKGROUNDS),
        *(Change("move", m, where=where, reference=ref) for m in mentions for where, ref in places),
        *(Change("add", m, where=where, reference=ref) for m in new for where, ref in [(None, None), *places]),
    }


def test_instructions_read_back_to_exactly_their_change():
    """Among the words of every change one could state about the source, each phrasing of an edit's change belongs
    to that change alone: the kind, value, placement and the objects named are all recoverable."""
    edits = [sample_edit(np.random.default_rng([9, i]), category) for category in CATEGORIES for i in range(3)]
    for edit in edits:
        readings: dict[str, set[Change]] = {}
        for candidate in every_change(edit.source):
            for language in LANGUAGES:
                for text in instructions([candidate], language):
                    readings.setdefault(text, set()).add(candidate)
        for change in edit.changes:
            for language in LANGUAGES:
                assert all(readings[text] == {change} for text in instructions([change], language))


def test_the_opposite_direction_states_the_same_changes_with_every_placement_turned_around():
    """Each phrasing maps to the phrasing (same template, same language) of the changes with `where` opposite, so
    a move's or placed addition's target contradicts it by place alone; without a placement there is none."""
    opposite, turned = OppositeDirection(), 0
    for edit in EDITS:
        flipped = [replace(change, where=OPPOSITE.get(change.where)) for change in edit.changes]
        for language in LANGUAGES:
            texts = instructions(edit.changes, language)
            wrong = [opposite(text) for text in texts]
            if all(change.where is None for change in edit.changes):
                assert wrong == [None] * len(texts)
                continue
            assert wrong == instructions(flipped, language) and [opposite(text) for text in wrong] == texts
            turned += len(texts)
    assert turned > 3000


def test_edits_change_what_they_say_and_nothing_else():
    """Read as their words say, the changes turn the source into the target: bystanders keep their exact geometry,
    named objects are unique, placements hold by a margin the source misses by, and the world's rules still hold."""
    for edit in EDITS:
        source, target = edit.source, edit.target
        assert source != target and 1 <= len(target.objects) <= 3
        for scene in (source, target):
            for i, a in enumerate(scene.objects):
                assert a.half_extent < min(a.x, a.y) and max(a.x, a.y) < CANVAS - a.half_extent
                assert not any(touching(a, b) for b in scene.objects[i + 1:])
        assert Counter(target.objects) == Counter([*edit.bystanders, *filter(None, edit.outcomes)])
        for change, outcome in zip(edit.changes, edit.outcomes):
            assert_read_as_said(edit, change, outcome)


def assert_read_as_said(edit: Edit, change: Change, outcome: ShapeObject | None):
    def the_one(mention, scene):
        (found,) = [obj for obj in scene.objects if mention.matches(obj)]
        return found

    if change.kind == "background":
        assert edit.target.background == change.value != edit.source.background
        return
    assert edit.target.background == edit.source.background or "background" in edit.kinds
    if change.kind == "add":
        assert change.subject.color and not any(change.subject.matches(obj) for obj in edit.source.objects)
        assert the_one(change.subject, edit.target) == outcome
    else:
        subject = the_one(change.subject, edit.source)
        assert [obj for obj in edit.target.objects if change.subject.matches(obj)] in ([], [outcome])
        expected = {"recolor": replace(subject, color=change.value), "resize": replace(subject, size=change.value),
                    "remove": None}.get(change.kind, outcome)
        assert outcome == expected
    if change.kind == "move":
        assert (outcome.shape, outcome.color, outcome.size) == (subject.shape, subject.color, subject.size)
        assert np.hypot(outcome.x - subject.x, outcome.y - subject.y) >= MIN_MOVE
    if change.where is not None:
        anchor = None if change.reference is None else the_one(change.reference, edit.source)
        assert anchor is None or anchor in edit.target.objects
        assert placed(outcome, change.where, anchor, RELATION_MARGIN)
        if change.kind == "move":
            assert not placed(subject, change.where, anchor, -RELATION_MARGIN)


def test_held_out_pairs_appear_in_no_image_and_no_instruction():
    looks = {(obj.color, obj.shape) for edit in EDITS for scene in (edit.source, edit.target) for obj in scene.objects}
    assert looks.isdisjoint(HELD_OUT) and len(looks) == 15
    texts = " | ".join(text for edit in EDITS for text in edit.instructions())
    for phrase in ("purple triangle", "orange circle", "green square", "紫の三角", "オレンジの丸", "緑の四角"):
        assert phrase not in texts


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="category"):
        sample_edit(np.random.default_rng(0), "rotate")
    for shares in ({"rotate": 1.0}, {"background+background": 1.0}):
        with pytest.raises(ValueError, match="add\\+move"):
            EditDataset(category_shares=shares)
    with pytest.raises(ValueError, match="non-negative"):
        EditDataset(category_shares={"add": 1.0, "move": -0.5})
    with pytest.raises(ValueError, match="languages"):
        EditDataset(languages=("fr",))
    with pytest.raises(ValueError, match="held_out"):
        EditDataset(held_out={("pink", "circle")})
    with pytest.raises(ValueError, match="languages"):
        edit_eval_cases(languages=())
    with pytest.raises(ValueError, match="per_kind"):
        edit_eval_cases(per_kind=0)


# ------------------------------------------------------------------------------------------------- scoring

def test_evaluation_cases_are_paired_across_languages_and_unseen_in_training():
    cases = edit_eval_cases(per_kind=3)
    english, japanese = cases[0::2], cases[1::2]
    assert [c.edit for c in english] == [c.edit for c in japanese] and {c.language for c in japanese} == {"ja"}
    assert Counter(c.category for c in english) == {category: 3 for category in CATEGORIES}
    assert cases == edit_eval_cases(per_kind=3) and cases != edit_eval_cases(per_kind=3, seed=1)
    assert all(c.instruction in c.edit.instructions((c.language,), "original") for c in cases)
    training_scenes = {scene for edit in EDITS for scene in (edit.source, edit.target)}
    training_scenes |= {ShapesDataset(seed=0).scene(index) for index in range(1500)}
    assert training_scenes.isdisjoint(scene for c in cases for scene in (c.edit.source, c.edit.target))


def test_the_original_templates_still_word_edits_as_the_first_edit_models_read_them():
    """Golden: sha256 of the instruction lists of 280 edits, taken from the code before the templates were extended
    (commit 0394144). The edit benchmark and the recipes of the earlier training parts rest on those lists."""
    texts = [sample_edit(np.random.default_rng([5, i]), category).instructions(templates="original")
             for category in CATEGORIES for i in range(40)]
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    assert digest == "c61b2051cc3b1d8837737c190e04953ea79510c70333327975417e840d35039f"
    extended = [sample_edit(np.random.default_rng([5, i]), category).instructions()
                for category in KINDS for i in range(40)]
    assert all(set(old) < set(new) for old, new in zip(texts, extended))  # two edits pair templates by index
    with pytest.raises(ValueError, match="templates"):
        EditDataset(templates="newest")


def test_unseen_wordings_are_no_training_phrasing_and_name_their_change_alone():
    """No training template words any change of the scene the way an unseen wording does, and each unseen wording
    belongs to one change: the evaluation asks for the same edits in words the model never read."""
    edits = [sample_edit(np.random.default_rng([11, i]), category) for category in KINDS for i in range(3)]
    for edit in edits:
        changes = every_change(edit.source)
        for language in LANGUAGES:
            trained = {text for change in changes for text in instructions([change], language)}
            readings: dict[str, set[Change]] = {}
            for change in changes:
                for text in unseen_instructions(change, language):
                    readings.setdefault(text, set()).add(change)
            assert trained.isdisjoint(readings)
            assert all(readings[text] == {change} for change in edit.changes
                       for text in unseen_instructions(change, language))


def test_unseen_wording_cases_ask_for_the_same_single_edits_in_other_words():
    trained, unseen = edit_eval_cases(per_kind=3), edit_eval_cases(per_kind=3, wording="unseen")
    single = [case for case in trained if case.category != TWO_EDITS]
    assert [(c.edit, c.language) for c in unseen] == [(c.edit, c.language) for c in single]
    assert all(c.instruction in unseen_instructions(c.edit.changes[0], c.language) for c in unseen)
    assert len({c.instruction for c in unseen}) == len(unseen)
    with pytest.raises(ValueError, match="wording"):
        edit_eval_cases(wording="paraphrased")
    with pytest.raises(ValueError, match="language"):
        unseen_instructions(unseen[0].edit.changes[0], "fr")


@pytest.mark.parametrize("canvas, blur_radius", [(64, 0.0), (64, 1.0), (128, 0.8)])
def test_the_target_scores_full_marks_and_the_source_no_success(canvas, blur_radius):
    for case in CASES:
        target, source = (blurred(render(scene, canvas), blur_radius) for scene in (case.edit.target, case.edit.source))
        assert score_edit(case, target)[:2] == (True, True), case
        success, preservation, details = score_edit(case, source)
        assert not success and preservation, case  # doing nothing fails the edit, not the rest of the scene


def blurred(image, radius):
    return image.filter(ImageFilter.GaussianBlur(radius * image.width / 64)) if radius else image


@pytest.mark.parametrize("blur_radius", [0.0, 1.0])
def test_a_recoloured_or_slightly_shifted_bystander_fails_preservation(blur_radius):
    damaged_cases = 0
    for case in CASES:
        edit = case.edit
        if not edit.bystanders:
            continue
        bystander = edit.bystanders[0]
        others = [obj for obj in edit.target.objects if obj != bystander]
        looks = {(o.color, o.shape) for o in [*edit.source.objects, *edit.target.objects]}
        recolored = [replace(bystander, color=c) for c in COLORS if (c, bystander.shape) not in looks | HELD_OUT]
        shifted = [moved for dx, dy in ((3, 0), (-3, 0), (0, 3), (0, -3))
                   if fits(moved := replace(bystander, x=bystander.x + dx, y=bystander.y + dy), others)]
        for damaged in recolored[:1] + shifted[:1]:
            scene = Scene(edit.target.background, tuple(damaged if o == bystander else o for o in edit.target.objects))
            success, preservation, details = score_edit(case, blurred(render(scene), blur_radius))
            assert success and not preservation and details.missing == (bystander,), (case, damaged)
            damaged_cases += 1
    assert damaged_cases >= 80


def fits(obj: ShapeObject, others: list[ShapeObject]) -> bool:
    """Inside the canvas and at least a pixel from every other box (so the detector keeps them apart)."""
    inside = obj.half_extent < min(obj.x, obj.y) and max(obj.x, obj.y) < CANVAS - obj.half_extent
    return inside and all(max(abs(obj.x - o.x), abs(obj.y - o.y)) >= obj.half_extent + o.half_extent + 1
                          for o in others)


CIRCLE, SQUARE = ShapeObject("circle", "red", "small", 16.0, 32.0), ShapeObject("square", "blue", "small", 48.0, 32.0)
GREEN_CIRCLE = replace(CIRCLE, color="green")
RECOLOR = EditCase(Edit(Scene("white", (CIRCLE, SQUARE)), Scene("white", (GREEN_CIRCLE, SQUARE)),
                        (Change("recolor", Mention("circle"), "green"),), (GREEN_CIRCLE,)),
                   "en", "make the circle green")


@pytest.mark.parametrize("drawn, success, preservation", [
    ((GREEN_CIRCLE, SQUARE), True, True),
    ((GREEN_CIRCLE, SQUARE, ShapeObject("triangle", "yellow", "small", 32.0, 55.0)), True, False),  # an extra object
    ((GREEN_CIRCLE,), True, False),                                                  # the bystander removed
    ((replace(CIRCLE, color="orange"), SQUARE), False, True),                        # the wrong colour
    ((replace(GREEN_CIRCLE, x=22.0), SQUARE), False, True),                          # recoloured, but moved too
    ((replace(CIRCLE, color="orange"), SQUARE, replace(GREEN_CIRCLE, y=10.0)), False, False),  # and an extra one
])
def test_failures_count_against_success_and_damage_against_preservation(drawn, success, preservation):
    assert score_edit(RECOLOR, render(Scene("white", drawn)))[:2] == (success, preservation)
    assert score_edit(RECOLOR, render(Scene("gray", (GREEN_CIRCLE, SQUARE))))[:2] == (True, False)


# ------------------------------------------------------------------------------------------------- evaluate

def test_perfect_edits_score_one_and_unedited_images_keep_everything():
    cases = edit_eval_cases(per_kind=2)
    targets = {(c.instruction, render(c.edit.source).tobytes()): render(c.edit.target) for c in cases}
    perfect = evaluate_edits(lambda images, texts, seeds: [targets[t, i.tobytes()] for i, t in zip(images, texts)],
                             cases, batch_size=5, progress=False)
    assert perfect.overall("success") == perfect.overall("preservation") == 1.0
    assert perfect.table().splitlines()[0] == \
        "| edit | success EN | success JA | success all | preservation EN | preservation JA | preservation all |"
    assert "| **overall** | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in perfect.table()

    seeds_seen = []

    def unedited(images, texts, seeds):
        seeds_seen.extend(seeds)
        return images

    report = evaluate_edits(unedited, cases, images_per_case=2, seed=10, progress=False)
    assert seeds_seen == [10, 11] * len(cases)
    summary = json.loads(report.to_json())
    assert summary["success"]["overall"] == 0.0 and summary["preservation"]["overall"] == 1.0
    assert summary["success"]["by_category_language"] == {f"{c}/{l}": 0.0 for c in CATEGORIES for l in LANGUAGES}
    assert len(summary["records"]) == 2 * len(cases) and summary["records"][2]["case"]["language"] == "ja"


def test_evaluate_refuses_an_editor_that_drops_images():
    with pytest.raises(ValueError, match="one edited image per source"):
        evaluate_edits(lambda images, texts, seeds: images[1:], edit_eval_cases(per_kind=1), progress=False)
    with pytest.raises(ValueError, match="no cases"):
        evaluate_edits(lambda images, texts, seeds: images, [], progress=False)

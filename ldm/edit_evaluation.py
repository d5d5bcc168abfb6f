"""Scoring an instruction-editing model on the shapes world: per edit category and language, success (the change
asked for happened) and preservation (nothing else changed), read off the edited images by ShapeEval's detector.

    cases = edit_eval_cases()                     # every category, English and Japanese, unseen scenes
    edit = lambda images, instructions, seeds: ...   # any callable: source images, texts, seeds -> edited images
    report = evaluate_edits(edit, cases)
    print(report.table())

An edited image is compared with its case's edit (`ldm.data.edits.Edit`): bystanders (objects no change
touches) must be found with their shape, colour and size within POSITION_TOLERANCE pixels of where they were,
the background must stay unless the instruction changes it, and no object may appear beyond those the changes
account for; each change must show in the image as its instruction states it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ldm.data.edits import (
    CATEGORIES, LANGUAGES, POSITION_TOLERANCE, TWO_EDITS, Change, Edit, Mention, check_languages, placed,
    sample_edit, unseen_instructions,
)
from ldm.data.shapes import CANVAS, ShapeObject, render
from ldm.evaluation import DetectedObject, Detection, detect, markdown_table

# Training edits of seed s come from np.random.default_rng([s, i]) (`EditDataset`); evaluation cases from
# default_rng([EVAL_STREAM, seed, category, i]): a seed of another length, so no training seed draws their scenes.
EVAL_STREAM = 0xED17
METRICS = ("success", "preservation")
# How the cases word their instructions: the original training templates (the benchmark every reported number
# uses), the extended ones (`ldm.data.edits.TEMPLATE_SETS`), or words no training template uses.
WORDINGS = ("original", "extended", "unseen")


@dataclass(frozen=True)
class EditCase:
    """An edit and the one instruction that asks for it in `language`."""

    edit: Edit
    language: str
    instruction: str

    @property
    def category(self) -> str:
        return self.edit.category

    def to_dict(self) -> dict:
        return {"category": self.category, "language": self.language, "instruction": self.instruction,
                "edit": asdict(self.edit)}


def edit_eval_cases(languages: Sequence[str] = LANGUAGES, per_kind: int = 16, seed: int = 0,
                    wording: str = "original") -> list[EditCase]:
    """`per_kind` edits of every category (CATEGORIES), each asked in every language: the same edits, so languages
    compare like for like. Case i takes phrasing i of its edit's list, so the phrasings take turns: the list of a
    training template set (WORDINGS), or with wording="unseen" phrasings no template produces
    (`unseen_instructions`; one change per edit, so two-edit instructions are left out)."""
    languages = check_languages(languages)
    if per_kind < 1:
        raise ValueError(f"per_kind={per_kind} must be at least 1")
    if wording not in WORDINGS:
        raise ValueError(f"unknown wording {wording!r}; choose one of {WORDINGS}")
    cases = []
    for number, category in enumerate(CATEGORIES):
        if wording == "unseen" and category == TWO_EDITS:
            continue
        for i in range(per_kind):
            edit = sample_edit(np.random.default_rng([EVAL_STREAM, seed, number, i]), category)
            for language in languages:
                texts = (unseen_instructions(edit.changes[0], language) if wording == "unseen"
                         else edit.instructions((language,), wording))
                cases.append(EditCase(edit, language, texts[i % len(texts)]))
    return cases


# ------------------------------------------------------------------------------------------------- scoring

@dataclass(frozen=True)
class EditDetails:
    detection: Detection
    achieved: tuple[bool, ...]        # per change of the edit, whether the image shows it
    missing: tuple[ShapeObject, ...]  # bystanders not found as and where they were
    extra: int                        # detected objects neither a bystander nor accounted for by a change
    background_kept: bool             # the source background, or any when the instruction changes it


class EditScore(NamedTuple):
    success: bool
    preservation: bool
    details: EditDetails


def score_edit(case: EditCase, image: Image.Image) -> EditScore:
    """Whether the edited image made every change of the case (success) and kept everything else (preservation).

    Bystanders are matched first, each to a detected object of its look within POSITION_TOLERANCE pixels. Each
    change then claims one of the objects left: recolor and resize want the outcome's look where the object was;
    move wants the object's look where it was asked (`edits.placed`, against the reference's true position);
    add wants an object that fits its words, placed as asked if asked; remove wants no object of the removed
    look left; background wants the new background. A change that failed accounts for one leftover object (its
    botched attempt, or the object not removed), so a failure costs success and only collateral damage costs
    preservation.
    """
    edit, detection = case.edit, detect(image)
    found = list(detection.objects)
    missing = tuple(obj for obj in edit.bystanders if _take(found, lambda seen, obj=obj: _same(seen, obj)) is None)
    achieved = tuple(_achieved(edit, change, outcome, found, detection.background)
                     for change, outcome in zip(edit.changes, edit.outcomes))
    failed_objects = sum(not done for change, done in zip(edit.changes, achieved) if change.kind != "background")
    extra = max(0, len(found) - failed_objects)
    background_kept = "background" in edit.kinds or detection.background == edit.source.background
    details = EditDetails(detection, achieved, missing, extra, background_kept)
    return EditScore(all(achieved), not missing and extra == 0 and background_kept, details)


def _achieved(edit: Edit, change: Change, outcome: ShapeObject | None, found: list[DetectedObject],
              background: str) -> bool:
    """Whether the image shows the change; the object that shows it is taken out of `found`."""
    if change.kind == "background":
        return background == change.value
    if change.kind == "remove":
        gone = Mention.of(edit.named(change.subject), ("color", "size"))
        return not any(gone.matches(seen) for seen in found)
    if change.kind in ("recolor", "resize"):
        return _take(found, lambda seen: _same(seen, outcome)) is not None
    wanted = change.subject if change.kind == "add" else Mention.of(outcome, ("color", "size"))
    anchor = edit.named(change.reference)
    return _take(found, lambda seen: wanted.matches(seen)
                 and (change.where is None or placed(seen, change.where, anchor))) is not None


def _same(seen: DetectedObject, obj: ShapeObject) -> bool:
    return ((seen.shape, seen.color, seen.size) == (obj.shape, obj.color, obj.size)
            and abs(seen.x - obj.x) <= POSITION_TOLERANCE and abs(seen.y - obj.y) <= POSITION_TOLERANCE)


def _take(found: list[DetectedObject], accept: Callable[[DetectedObject], bool]) -> DetectedObject | None:
    """Remove from `found` and return the first object accepted (None when none is)."""
    for index, seen in enumerate(found):
        if accept(seen):
            return found.pop(index)
    return None


# ------------------------------------------------------------------------------------------------- evaluation

EditFn = Callable[[list[Image.Image], list[str], list[int]], Sequence[Image.Image]]


@dataclass(frozen=True)
class EditRecord:
    case: EditCase
    seed: int
    score: EditScore

    def to_dict(self) -> dict:
        return {"case": self.case.to_dict(), "seed": self.seed, "success": self.score.success,
                "preservation": self.score.preservation, "details": asdict(self.score.details)}


@dataclass
class EditReport:
    records: list[EditRecord] = field(default_factory=list)

    def rate(self, metric: str, category: str | None = None, language: str | None = None) -> float | None:
        """Fraction of images that pass `metric` among those matching every given filter (None when none do)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        chosen = [getattr(record.score, metric) for record in self.records
                  if category in (None, record.case.category) and language in (None, record.case.language)]
        return sum(chosen) / len(chosen) if chosen else None

    def overall(self, metric: str, language: str | None = None) -> float | None:
        """Mean of the category rates: each category weighs the same, as in ShapeEval."""
        rates = [rate for rate in (self.rate(metric, category, language) for category in CATEGORIES)
                 if rate is not None]
        return sum(rates) / len(rates) if rates else None

    def languages(self) -> list[str]:
        return [language for language in LANGUAGES if any(r.case.language == language for r in self.records)]

    def table(self) -> str:
        """Markdown: a row per category and the overall mean; success and preservation per language and all."""
        columns = [(metric, language) for metric in METRICS for language in [*self.languages(), None]]
        names = [f"{metric} {language.upper() if language else 'all'}" for metric, language in columns]
        rows = [(category, [self.rate(metric, category, language) for metric, language in columns])
                for category in CATEGORIES]
        rows.append(("**overall**", [self.overall(metric, language) for metric, language in columns]))
        return markdown_table("edit", names, rows)

    def to_json(self) -> str:
        summary = {metric: {
            "overall": self.overall(metric),
            "by_language": {language: self.overall(metric, language) for language in self.languages()},
            "by_category_language": {f"{category}/{language}": self.rate(metric, category, language)
                                     for category in CATEGORIES for language in self.languages()},
        } for metric in METRICS}
        return json.dumps({**summary, "records": [r.to_dict() for r in self.records]}, ensure_ascii=False)


def evaluate_edits(edit_fn: EditFn, cases: Sequence[EditCase], images_per_case: int = 1, seed: int = 0,
                   size: int = CANVAS, batch_size: int = 64, progress: bool = True) -> EditReport:
    """Edit every case's source (rendered at size x size) by its instruction images_per_case times and score each
    result. Image k of every case gets seed + k, so a case's images do not depend on the other cases.
    `edit_fn(images, instructions, seeds)` returns one edited image per source image, in order."""
    if not cases:
        raise ValueError("no cases to evaluate; build them with edit_eval_cases()")
    if images_per_case < 1 or batch_size < 1 or size < 1:
        raise ValueError(f"images_per_case={images_per_case}, batch_size={batch_size} and size={size} must be at "
                         "least 1")
    jobs = [(case, seed + k) for case in cases for k in range(images_per_case)]
    report = EditReport()
    with tqdm(total=len(jobs), disable=not progress, desc="edit eval") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            sources = [render(case.edit.source, size) for case, _ in batch]
            images = list(edit_fn(sources, [case.instruction for case, _ in batch], [s for _, s in batch]))
            if len(images) != len(batch):
                raise ValueError(f"edit_fn returned {len(images)} images for {len(batch)} sources; it must return "
                                 "one edited image per source, in order")
            report.records += [EditRecord(case, s, score_edit(case, image)) for (case, s), image in zip(batch, images)]
            bar.update(len(batch))
    return report


def evaluate_edit_model(model: str, steps: int = 20, guidance: float = 7.5, image_guidance: float = 1.5,
                        images_per_case: int = 1, per_kind: int = 16, progress: bool = True,
                        candidates: int | None = 1, wording: str = "original") -> EditReport:
    """The edit evaluation of an instruction-editing model: an embedded model's name or a diffusers folder.
    `candidates`: edits drawn per output image, one kept (`ldm.candidates`); 1 scores the model alone, None the
    model's recommendation. `wording`: how the instructions are worded (WORDINGS, `edit_eval_cases`)."""
    cases = edit_eval_cases(per_kind=per_kind, wording=wording)  # checked before the model loads
    import torch

    from ldm.editing import InstructPix2PixPipeline  # here: scoring alone needs no model code

    pipe = InstructPix2PixPipeline.from_pretrained(model)
    pipe.progress_bar = False

    def edit(images, instructions, seeds):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return pipe(list(instructions), image=list(images), num_inference_steps=steps, guidance_scale=guidance,
                    image_guidance_scale=image_guidance, generator=generators, num_candidates=candidates).images

    return evaluate_edits(edit, cases, images_per_case, progress=progress)


@dataclass(frozen=True)
class EditEvalProbe:
    """A quick edit evaluation that tracks a training run (config `evaluation: {target:
    ldm.edit_evaluation.EditEvalProbe, params: {per_kind: 4}}`): overall success and preservation, and success
    per category, on fixed cases and seeds."""
    per_kind: int = 4
    images_per_case: int = 1
    steps: int = 20
    guidance: float = 7.5
    image_guidance: float = 1.5

    def __call__(self, model: Path) -> dict[str, float | None]:
        report = evaluate_edit_model(str(model), self.steps, self.guidance, self.image_guidance,
                                     self.images_per_case, self.per_kind, progress=False)
        return {**{metric: report.overall(metric) for metric in METRICS},
                **{f"success/{category}": report.rate("success", category) for category in CATEGORIES},
                **{f"{metric}/{language}": report.overall(metric, language) for metric in METRICS
                   for language in LANGUAGES}}

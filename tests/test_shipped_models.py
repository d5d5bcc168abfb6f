"""The shipped models keep the quality weights.md and the README report: a subset of each evaluation, with floors a
few points under what the shipped weights measured (`make test-slow`; a few minutes on 2 cores)."""

from __future__ import annotations

import pytest

from ldm.edit_evaluation import evaluate_edit_model
from ldm.evaluation import evaluate_model

# Measured on the shipped weights: ShapeEval seen 0.98 (English 1.00, Japanese 0.96), background 0.875 on this subset
# (0.908 and 0.930 over all prompts, weights.md); edit success 0.82 and preservation 0.79 on its subset at image
# guidance 1.5 (0.864 and 0.826 over all cases at the recommended 2.5); at the recommended settings (image guidance
# 2.5, 5 candidates per image) 0.82 and 0.91 on the same subset (against 0.80 and 0.82 with one candidate).
SHAPES_SEEN_FLOOR, BACKGROUND_FLOOR = 0.9, 0.8
EDIT_GUIDANCE, EDIT_IMAGE_GUIDANCE = 7.5, 1.5
EDIT_SUCCESS_FLOOR, EDIT_PRESERVATION_FLOOR, EDIT_BACKGROUND_FLOOR = 0.76, 0.74, 0.9
RECOMMENDED_SUCCESS_FLOOR, RECOMMENDED_PRESERVATION_FLOOR = 0.77, 0.86

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")]


def test_shapes_keeps_its_shapeeval_scores():
    report = evaluate_model("shapes", steps=20, guidance=5.0, images_per_prompt=2, limit=4, progress=False)
    assert report.overall(split="seen") >= SHAPES_SEEN_FLOOR
    assert report.accuracy("background") >= BACKGROUND_FLOOR
    # Japanese prompts are followed like English ones
    assert abs(report.overall(split="seen", language="ja") - report.overall(split="seen", language="en")) <= 0.08


def test_shapes_edit_keeps_its_edit_scores():
    report = evaluate_edit_model("shapes-edit", steps=20, guidance=EDIT_GUIDANCE, image_guidance=EDIT_IMAGE_GUIDANCE,
                                 images_per_case=1, per_kind=4, progress=False)
    assert report.overall("success") >= EDIT_SUCCESS_FLOOR
    assert report.overall("preservation") >= EDIT_PRESERVATION_FLOOR
    assert report.rate("success", "background") >= EDIT_BACKGROUND_FLOOR
    assert abs(report.overall("success", "ja") - report.overall("success", "en")) <= 0.15


def test_shapes_edit_at_its_recommended_settings_keeps_more_of_the_image():
    report = evaluate_edit_model("shapes-edit", steps=20, guidance=EDIT_GUIDANCE, image_guidance=2.5,
                                 images_per_case=1, per_kind=4, progress=False, candidates=None)
    assert report.overall("success") >= RECOMMENDED_SUCCESS_FLOOR
    assert report.overall("preservation") >= RECOMMENDED_PRESERVATION_FLOOR

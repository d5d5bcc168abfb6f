"""The relation gap: contradicting captions that differ from the truth in one respect, and an error ratio that is
exactly 0 for a UNet that cannot read text and clearly positive for colours in the shipped model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldm.cli import main
from ldm.data.shapes import Scene, captions
from ldm.loading import load_components, save_diffusers_folder
from ldm.relation_gap import CONTRADICTIONS, captions_and_contradictions, gap_table, pair_scenes, relation_gaps


def test_each_contradiction_is_false_of_the_scene_and_true_of_it_changed_in_one_respect():
    for scene in pair_scenes(200):
        a, b = scene.objects
        moved = Scene(scene.background, (replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)))
        recoloured = Scene(scene.background, (replace(a, color=b.color), replace(b, color=a.color)))
        for language in ("en", "ja"):
            true, wrong = captions_and_contradictions(scene, language)
            assert true in captions(scene)
            assert wrong["opposite relation"] not in captions(scene) and wrong["opposite relation"] in captions(moved)
            assert wrong["swapped colours"] not in captions(scene) and wrong["swapped colours"] in captions(recoloured)


def test_a_unet_that_cannot_read_the_text_has_no_gap(tmp_path):
    components = load_components("shapes")
    for name, parameter in components.unet.named_parameters():
        if "attn2.to_out" in name:  # cross-attention adds nothing: the text cannot change the prediction
            parameter.data.zero_()
    save_diffusers_folder(components, tmp_path / "blind")
    gaps = relation_gaps(str(tmp_path / "blind"), scenes=4, timesteps=(300, 900))
    assert set(gaps) == {(kind, language) for kind in CONTRADICTIONS for language in ("en", "ja")}
    assert all(gap == 0.0 for row in gaps.values() for gap in row.values())


def test_the_shipped_model_reads_colours():
    gaps = relation_gaps("shapes", scenes=16, timesteps=(500, 700))
    for language in ("en", "ja"):
        assert min(gaps[("swapped colours", language)].values()) > 0.1
    assert "| swapped colours, ja |" in gap_table(gaps)


def test_bad_settings_are_named(capsys):
    assert main(["eval", "--task", "relation_gap", "--scenes", "0"]) == 2
    assert "scenes=0 must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"timesteps \[1000\] must lie in \[0, 1000\)"):
        relation_gaps("shapes", scenes=1, timesteps=(1000,))

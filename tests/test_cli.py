"""`ldm edit` and `ldm eval --task edit`: the command line gives what the pipelines give, and bad input is one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from ldm.editing import ImageToImagePipeline, InpaintPipeline, InstructPix2PixPipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture
def picture(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def mask(tmp_path):
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[4:12, 2:9] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)
    return path


def _written(capsys) -> list[np.ndarray]:
    paths = capsys.readouterr().out.split()
    return [np.asarray(Image.open(path)) for path in paths]


def test_edit_by_instruction_equals_the_pipeline_call(tiny_editing_folder, picture, tmp_path, capsys):
    folder = str(tiny_editing_folder("pix2pix")[0])
    assert main(["edit", str(picture), "make the circle blue", "--model", folder, "--steps", "3", "--seed", "4",
                 "--image-guidance", "1.2", "--images", "2", "--output", str(tmp_path / "out")]) == 0
    written = _written(capsys)
    pipe = InstructPix2PixPipeline.from_pretrained(folder)
    expected = pipe("make the circle blue", image=Image.open(picture), num_inference_steps=3, seed=4,
                    image_guidance_scale=1.2, num_images_per_prompt=2).images
    assert len(written) == 2
    for ours, theirs in zip(written, expected):
        np.testing.assert_array_equal(ours, np.asarray(theirs))


def test_edit_takes_the_models_recommended_settings_unless_told(tiny_editing_folder, picture, tmp_path, capsys):
    import shutil

    from ldm.metadata import read_settings

    folder = shutil.copytree(tiny_editing_folder("pix2pix")[0], tmp_path / "model")
    (folder / "sampling_defaults.json").write_text('{"num_inference_steps": 3, "image_guidance_scale": 1.2}')
    assert main(["edit", str(picture), "make the circle blue", "--model", str(folder), "--seed", "4",
                 "--output", str(tmp_path / "out")]) == 0
    path = capsys.readouterr().out.split()[0]
    settings = read_settings(path)
    assert (settings["num_inference_steps"], settings["guidance_scale"], settings["image_guidance_scale"]) == (3, 7.5, 1.2)
    pipe = InstructPix2PixPipeline.from_pretrained(folder)
    expected = pipe("make the circle blue", image=Image.open(picture), num_inference_steps=3, seed=4,
                    image_guidance_scale=1.2).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(expected))
    assert main(["edit", str(picture), "make the circle blue", "--model", str(folder), "--image-guidance", "2",
                 "--output", str(tmp_path / "told")]) == 0
    assert read_settings(capsys.readouterr().out.split()[0])["image_guidance_scale"] == 2.0


def test_edit_with_a_mask_inpaints_and_keeps_the_rest(tiny_editing_folder, picture, mask, tmp_path, capsys):
    folder = str(tiny_editing_folder("inpaint")[0])
    assert main(["edit", str(picture), "a red circle", "--mask", str(mask), "--model", folder, "--steps", "3",
                 "--output", str(tmp_path / "out")]) == 0
    (written,) = _written(capsys)
    expected = InpaintPipeline.from_pretrained(folder)("a red circle", image=Image.open(picture),
                                                        mask_image=Image.open(mask), num_inference_steps=3, seed=0,
                                                        keep_unmasked=True).images[0]
    np.testing.assert_array_equal(written, np.asarray(expected))
    outside = np.asarray(Image.open(mask)) == 0
    np.testing.assert_array_equal(written[outside], np.asarray(Image.open(picture))[outside])


def test_edit_with_strength_is_img2img(tiny_editing_folder, picture, tmp_path, capsys):
    folder = str(tiny_editing_folder("img2img")[0])
    assert main(["edit", str(picture), "a red circle", "--strength", "0.5", "--model", folder, "--steps", "4",
                 "--output", str(tmp_path / "out")]) == 0
    (written,) = _written(capsys)
    expected = ImageToImagePipeline.from_pretrained(folder)("a red circle", image=Image.open(picture),
                                                             strength=0.5, num_inference_steps=4, seed=0).images[0]
    np.testing.assert_array_equal(written, np.asarray(expected))


@pytest.mark.parametrize("extra, message", [
    (["--strength", "1.5"], "strength=1.5"),
    (["--mask", "missing.png"], "no such file"),
])
def test_bad_edit_input_is_one_line_and_writes_nothing(tiny_editing_folder, picture, tmp_path, capsys, extra,
                                                       message):
    folder = str(tiny_editing_folder("img2img")[0])
    output = tmp_path / "out"
    assert main(["edit", str(picture), "a red circle", "--model", folder, "--output", str(output), *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not output.exists()


def test_a_file_that_is_not_an_image_is_named(tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert main(["edit", str(text), "make the circle blue"]) == 2
    assert "is not an image file" in capsys.readouterr().err


def test_edit_eval_scores_every_category_in_both_languages(tiny_editing_folder, capsys):
    folder = str(tiny_editing_folder("pix2pix")[0])
    assert main(["eval", "--task", "edit", "--model", folder, "--steps", "2", "--limit", "1",
                 "--images-per-prompt", "1"]) == 0
    table = capsys.readouterr().out
    for category in ("recolor", "background", "move", "add", "remove", "resize", "two_edits"):
        assert f"| {category} |" in table
    assert "success EN" in table and "preservation JA" in table


def test_edit_eval_in_unseen_wording_leaves_two_edit_instructions_out(tiny_editing_folder, capsys):
    folder = str(tiny_editing_folder("pix2pix")[0])
    assert main(["eval", "--task", "edit", "--model", folder, "--steps", "1", "--limit", "1",
                 "--images-per-prompt", "1", "--wording", "unseen"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["two_edits"].count("–") == 6 and "–" not in rows["recolor"]


def test_each_instruction_gets_its_own_file(tiny_editing_folder, picture, tmp_path, capsys):
    folder = str(tiny_editing_folder("pix2pix")[0])
    for text in ("丸を青くして", "背景を黒にして"):
        assert main(["edit", str(picture), text, "--model", folder, "--steps", "1",
                     "--output", str(tmp_path / "out")]) == 0
    assert len(set(capsys.readouterr().out.split())) == 2 == len(list((tmp_path / "out").glob("*.png")))

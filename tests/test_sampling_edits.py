"""`ldm sample` with input images: each mode's images equal a direct call of its editing pipeline with the same seed,
a job resumes and remakes exactly what a changed input invalidates, `ldm info` / `--from-png` know the inputs, and
bad input is one clear line (exit 2) before anything is written."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ldm.editing import ImageToImagePipeline, InpaintPipeline, InstructPix2PixPipeline
from ldm.metadata import read_settings
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling_job import load_job, main, run_job

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

EXAMPLES = Path(__file__).resolve().parents[1] / "configs" / "sample"
SIZE = (17, 13)  # the inputs' (width, height); the tiny models' VAE factor is 2, so edits come out 16x12
COMMON = dict(seeds=[3, 4], steps=3, guidance=6.0, negative_prompt="blurry")


def picture(seed: int = 0, size=SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def rectangle_mask(size=SIZE, box=(4, 3, 12, 9)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder holding the inputs the configs below name by relative path."""
    picture(0).save(tmp_path / "image.png")
    picture(1).save(tmp_path / "other.png")
    rectangle_mask().save(tmp_path / "mask.png")
    rectangle_mask(size=(8, 8), box=(0, 0, 4, 4)).save(tmp_path / "small-mask.png")
    Image.new("L", SIZE, 0).save(tmp_path / "black-mask.png")
    (tmp_path / "notes.png").write_text("not a picture")
    return tmp_path


def write_config(folder: Path, **fields) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(fields), encoding="utf-8")
    return path


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@lru_cache(maxsize=None)
def loaded(pipeline_class, folder: Path):
    pipe = pipeline_class.from_pretrained(folder)
    pipe.progress_bar = False
    return pipe


def direct(folder: Path, pipeline_class, prompt: str, seed: int, folder_of_inputs: Path, **arguments) -> np.ndarray:
    """The reference: a plain call of `pipeline_class` with the job's settings; "*.png" values name input files."""
    arguments = {key: str(folder_of_inputs / value) if str(value).endswith(".png") else value
                 for key, value in arguments.items()}
    call = dict(negative_prompt=COMMON["negative_prompt"], num_inference_steps=COMMON["steps"],
                guidance_scale=COMMON["guidance"], seed=seed)
    return np.asarray(loaded(pipeline_class, folder)(prompt, **{**call, **arguments}).images[0])


def manifest_keys(folder: Path) -> list[str]:
    lines = (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["key"] for line in lines]


# ------------------------------------------------------------------------------------------ each mode, exactly

# (tiny model, the config's extra fields, its prompt items, each item's direct call: pipeline and arguments)
MODES = {
    "4-channel model: text-to-image, image-to-image and latent-blend inpainting in one job": (
        "img2img", dict(image="image.png", sampler="Euler a"),
        [{"prompt": "a red circle", "image": None, "candidates": 2},
         {"prompt": "a blue square", "strength": 0.6},
         {"prompt": "a green triangle", "mask": "mask.png", "strength": 0.7, "mask_blur": 1, "keep_unmasked": True}],
        [(LatentDiffusionPipeline, dict(sampler="Euler a", num_candidates=2)),
         (ImageToImagePipeline, dict(image="image.png", strength=0.6, sampler="Euler a")),
         (InpaintPipeline, dict(image="image.png", mask_image="mask.png", strength=0.7, mask_blur=1,
                                keep_unmasked=True, sampler="Euler a"))]),
    "9-channel model: inpainting, with the model's own scheduler": (
        "inpaint", dict(mask="mask.png"),
        [{"prompt": "a red circle", "image": "image.png"}, {"prompt": "a blue square", "image": "other.png",
                                                           "strength": 0.5}],
        [(InpaintPipeline, dict(image="image.png", mask_image="mask.png")),
         (InpaintPipeline, dict(image="other.png", mask_image="mask.png", strength=0.5))]),
    "8-channel model: instruction editing": (
        "pix2pix", dict(image="image.png", sampler="DPM++ 2M"),
        ["make the circle red", {"prompt": "make it blue", "image_guidance": 1.2, "candidates": 3}],
        [(InstructPix2PixPipeline, dict(image="image.png", sampler="DPM++ 2M")),
         (InstructPix2PixPipeline, dict(image="image.png", image_guidance_scale=1.2, num_candidates=3,
                                        sampler="DPM++ 2M"))]),
}


@pytest.mark.parametrize("case", MODES)
def test_each_mode_equals_a_direct_pipeline_call_with_the_same_seed(tiny_editing_folder, inputs, case):
    task, fields, prompts, calls = MODES[case]
    folder = tiny_editing_folder(task)[0]
    config = write_config(inputs, model=str(folder), prompts=prompts, output=str(inputs / "out"), **COMMON,
                          **fields)
    assert main(["sample", str(config)]) == 0
    job = load_job(config)
    assert len(job.items) == 2 * len(prompts)
    for item in job.items:
        pipeline_class, arguments = calls[item.number]
        prompt, seed = item.request["prompt"], item.request["seed"]
        expected = direct(folder, pipeline_class, prompt, seed, inputs, **arguments)
        np.testing.assert_array_equal(pixels(job.output / item.filename), expected)
        settings = read_settings(job.output / item.filename)
        assert settings.get("pipeline", "LatentDiffusionPipeline") == pipeline_class.__name__
        assert settings.get("image") == item.request.get("image")  # the absolute path of the input
    assert manifest_keys(job.output) == [item.key for item in job.items]


def test_the_edit_example_equals_direct_calls(tiny_editing_folder, tmp_path):
    folder = tiny_editing_folder("img2img")[0]
    overrides = [f"model={folder}", "width=16", "height=16", "steps=2", f"output={tmp_path / 'edit'}"]
    assert main(["sample", str(EXAMPLES / "edit.yaml"), *overrides]) == 0
    job = load_job(EXAMPLES / "edit.yaml", overrides)
    image, mask = (str(EXAMPLES / "inputs" / name) for name in ("red-circle-blue-square.png", "square-mask.png"))
    calls = [(ImageToImagePipeline, {}), (InpaintPipeline, dict(mask_image=mask, mask_blur=2, keep_unmasked=True))]
    assert [item.request["image"] for item in job.items] == [image] * 4  # relative to the config's folder
    for item in job.items:
        pipeline_class, extra = calls[item.number]
        expected = loaded(pipeline_class, folder)(
            item.request["prompt"], image=image, strength=0.75, sampler="DPM++ 2M", num_inference_steps=2,
            guidance_scale=5.0, height=16, width=16, seed=item.request["seed"], **extra).images[0]
        np.testing.assert_array_equal(pixels(job.output / item.filename), np.asarray(expected))
    assert job.items[2].key == ("0001-a-red-circle-to-the-left-of-a-green-s0-from-red-circle-blue-square-"
                                f"{job.items[2].request['image_sha256']}-mask-{job.items[2].request['mask_sha256']}")


def test_the_instruction_example_equals_direct_calls(tiny_editing_folder, tmp_path):
    folder = tiny_editing_folder("pix2pix")[0]
    overrides = [f"model={folder}", "width=16", "height=16", "steps=2", f"output={tmp_path / 'instructions'}"]
    assert main(["sample", str(EXAMPLES / "instructions.yaml"), *overrides]) == 0
    job = load_job(EXAMPLES / "instructions.yaml", overrides)
    image = str(EXAMPLES / "inputs" / "red-circle-blue-square.png")
    assert [item.request["candidates"] for item in job.items] == [5, 5, 5, 5, 1, 1]
    for item in job.items:
        expected = loaded(InstructPix2PixPipeline, folder)(
            item.request["prompt"], image=image, sampler="DPM++ 2M", num_inference_steps=2, guidance_scale=7.5,
            image_guidance_scale=2.5, num_candidates=item.request["candidates"], height=16, width=16,
            seed=item.request["seed"]).images[0]
        np.testing.assert_array_equal(pixels(job.output / item.filename), np.asarray(expected))


def test_a_relative_input_starts_at_the_file_that_names_it(tiny_editing_folder, inputs, tmp_path_factory,
                                                            monkeypatch):
    lists = inputs / "lists"
    lists.mkdir()
    picture(2).save(lists / "image.png")  # the same name as the config's own image.png, other content
    (lists / "items.jsonl").write_text(json.dumps({"prompt": "b", "image": "image.png"}) + "\n", encoding="utf-8")
    shell = tmp_path_factory.mktemp("shell")
    picture(3).save(shell / "image.png")
    monkeypatch.chdir(shell)  # neither the config's folder nor the prompt file's
    config = write_config(inputs, model=str(tiny_editing_folder("img2img")[0]), image="image.png", strength=0.5,
                          prompts="lists/items.jsonl", seeds=[0])

    def images(*overrides):
        return [(item.request["image"], item.request["mask"]) for item in load_job(config, list(overrides)).items]

    assert images() == [(str(lists / "image.png"), None)]  # the line's path: from the prompt file's folder
    inline = 'prompts=[a, {prompt: b, mask: mask.png}]'
    Image.open(inputs / "mask.png").save(shell / "mask.png")
    assert images(inline) == [(str(inputs / "image.png"), None),  # the config's image, its mask from the shell
                              (str(inputs / "image.png"), str(shell / "mask.png"))]
    write_config(inputs, model=str(tiny_editing_folder("img2img")[0]), image="image.png", strength=0.5, seeds=[0],
                 prompts=["a", {"prompt": "b", "mask": "mask.png"}])
    assert images() == [(str(inputs / "image.png"), None), (str(inputs / "image.png"), str(inputs / "mask.png"))]
    assert images("image=image.png") == [(str(shell / "image.png"), None),
                                         (str(shell / "image.png"), str(inputs / "mask.png"))]


# ------------------------------------------------------------------------------------------ resume and change

def test_a_resumed_job_makes_only_the_missing_images(tiny_editing_folder, inputs):
    config = write_config(inputs, model=str(tiny_editing_folder("img2img")[0]), image="image.png", strength=0.6,
                          prompts=["a red circle", {"prompt": "a blue square", "mask": "mask.png"}],
                          output=str(inputs / "out"), grid=False, **COMMON)
    job = load_job(config)
    first = run_job(job)
    assert (first.made, first.already_done) == (4, 0)
    made = {item.key: pixels(job.output / item.filename) for item in job.items}
    for item in job.items[1::2]:  # as if the first run had stopped half-way
        (job.output / item.filename).unlink()
    again = run_job(load_job(config))
    assert (again.made, again.already_done, again.job.ok) == (2, 2, 4)
    for item in job.items:
        np.testing.assert_array_equal(pixels(job.output / item.filename), made[item.key])


@pytest.mark.parametrize("filename", [None, "{item}-s{seed}"])  # by default the name holds the sha256; else the request
def test_a_changed_input_image_invalidates_exactly_its_outputs(tiny_editing_folder, inputs, filename):
    folder = tiny_editing_folder("img2img")[0]
    naming = {} if filename is None else {"filename": filename}
    config = write_config(inputs, model=str(folder), image="image.png", strength=0.6, output=str(inputs / "out"),
                          prompts=["a red circle", {"prompt": "a blue square", "image": "other.png"}], **COMMON,
                          **naming)
    assert run_job(load_job(config)).made == 4
    picture(7).save(inputs / "image.png")  # new content, same path
    job = load_job(config)
    result = run_job(job)
    assert (result.made, result.already_done) == (2, 2)  # the two images of the first prompt only
    for item in job.items[:2]:
        expected = direct(folder, ImageToImagePipeline, "a red circle", item.request["seed"], inputs,
                          image="image.png", strength=0.6)
        np.testing.assert_array_equal(pixels(job.output / item.filename), expected)
    assert manifest_keys(job.output) == [item.key for item in job.items]


def test_an_input_changed_after_planning_fails_its_images_only(tiny_editing_folder, inputs):
    config = write_config(inputs, model=str(tiny_editing_folder("img2img")[0]), image="image.png",
                          prompts=["a red circle", {"prompt": "a blue square", "image": "other.png"}],
                          output=str(inputs / "out"), **COMMON)
    job = load_job(config)
    picture(7).save(inputs / "image.png")  # between planning and making
    result = run_job(job)
    assert (result.made, result.failed) == (2, 2)
    lines = [json.loads(line) for line in (job.output / "manifest.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["failed", "failed", "ok", "ok"]
    assert "changed while the job ran" in lines[0]["error"]


# ------------------------------------------------------------------------------------------ info and --from-png

def test_info_prints_the_edit_and_from_png_remakes_it_while_the_inputs_are_there(tiny_editing_folder, inputs,
                                                                                  capsys):
    config = write_config(inputs, model=str(tiny_editing_folder("img2img")[0]), image="image.png", mask="mask.png",
                          strength=0.7, mask_blur=1, keep_unmasked=True, prompts=["a red circle"], seeds=[5],
                          steps=2, output=str(inputs / "out"))
    assert main(["sample", str(config)]) == 0
    job = load_job(config)
    png, request = job.output / job.items[0].filename, job.items[0].request
    capsys.readouterr()
    assert main(["info", str(png)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "Denoising strength: 0.7, Mask blur: 1.0" in printed[1]
    assert printed[2] == (f"Edit: InpaintPipeline, image {inputs / 'image.png'} (sha256 {request['image_sha256']}), "
                          f"mask {inputs / 'mask.png'} (sha256 {request['mask_sha256']}), strength 0.7, mask_blur 1.0, "
                          "keep_unmasked True")
    assert main(["sample", "--from-png", str(png), "--output", str(inputs / "again")]) == 0
    assert "identical pixels" in capsys.readouterr().out
    np.testing.assert_array_equal(pixels(inputs / "again" / png.name), pixels(png))
    (inputs / "mask.png").rename(inputs / "moved.png")
    assert main(["sample", "--from-png", str(png), "--output", str(inputs / "third")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"its input mask {inputs / 'mask.png'} is missing" in error
    assert not (inputs / "third").exists()


# ------------------------------------------------------------------------------------------ bad input

BAD_INPUTS = [
    ("img2img", dict(image="missing.png"), ["job.yaml: image='missing.png': no such file",
                                            "starts at the folder of the file that names it"]),
    ("img2img", dict(image="notes.png"), ["image='notes.png' is not an image PIL can read"]),
    ("img2img", dict(prompts=[{"prompt": "a", "image": "missing.png"}]), ["prompts[0]: image='missing.png'"]),
    ("img2img", dict(mask="mask.png"), ["prompts[0]: mask='mask.png' needs an image to edit"]),
    ("img2img", dict(image="image.png", mask="small-mask.png"), ["mask='small-mask.png' is 8x8",
                                                                  "image='image.png' is 17x13"]),
    ("img2img", dict(image="image.png", mask="black-mask.png"), ["mask='black-mask.png' has no white pixel"]),
    ("img2img", dict(image="image.png", strength=0), ["strength=0 must be a number in (0, 1]"]),
    ("img2img", dict(image="image.png", strength=[0.5, 1.5]), ["strength=1.5 must be a number in (0, 1]"]),
    ("img2img", dict(image="image.png", image_guidance=-1), ["image_guidance=-1 must be a number >= 0"]),
    ("img2img", dict(image="image.png", keep_unmasked="yes"), ["keep_unmasked='yes' must be true or false"]),
    ("pix2pix", dict(image="image.png", candidates=0), ["candidates=0 must be an integer >= 1"]),
    ("img2img", dict(image="image.png", mask_blur=2), ["mask_blur=2.0 applies to inpainting only", "give a mask"]),
    ("img2img", dict(strength=0.5), ["strength=0.5 needs an image to edit"]),
    # Checked once the model is loaded, still before any image:
    ("img2img", dict(image="image.png", image_guidance=1.5), ["image_guidance=1.5 applies to instruction editing",
                                                              "image-to-image", "in_channels=4"]),
    ("inpaint", dict(image="image.png"), ["is an inpainting model (UNet in_channels=9)", "cannot do image-to-image",
                                          "give every item an image and a mask"]),
    ("inpaint", {}, ["is an inpainting model", "cannot do text-to-image"]),
    ("pix2pix", dict(image="image.png", mask="mask.png"), ["instruction-editing model (UNet in_channels=8)",
                                                            "cannot do inpainting", "no mask"]),
    ("img2img", dict(image="image.png", candidates=2), ["candidates=2 applies to text-to-image and instruction "
                                                        "editing", "image-to-image", "in_channels=4"]),
    ("img2img", dict(image="image.png", mask="mask.png", candidates=3), ["candidates=3 applies to text-to-image",
                                                                         "inpainting", "remove candidates"]),
    ("pix2pix", dict(image="image.png", strength=0.5), ["strength=0.5 applies to image-to-image and inpainting",
                                                        "instruction editing", "remove strength"]),
]


@pytest.mark.parametrize("task, fields, expected", BAD_INPUTS)
def test_bad_input_gives_one_clear_line_exit_2_and_writes_nothing(tiny_editing_folder, inputs, capsys, task,
                                                                  fields, expected):
    config = write_config(inputs, **{"model": str(tiny_editing_folder(task)[0]), "prompts": ["a"], "steps": 1,
                                     "output": str(inputs / "out"), **fields})
    assert main(["sample", str(config)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("ldm sample: error:") and message.count("\n") == 0
    for part in expected:
        assert part in message
    assert not (inputs / "out").exists()
